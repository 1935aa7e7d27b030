"""The fork launcher: results come back by rank (also as a module-scoped fixture); failures,
crashes and hangs fail fast."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedTestError, ranks_fixture, run_distributed


def _sum_of_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, world_size, torch.get_num_threads(), t.item() * scale, os.environ["RANK"])


def test_results_by_rank_and_one_thread_per_rank():
    results = run_distributed(_sum_of_ranks, 4, 2.0, timeout=30)
    assert results == [(r, 4, 1, 12.0, str(r)) for r in range(4)]


two_ranks = ranks_fixture(_sum_of_ranks, 2, 3.0, timeout=30)


def test_a_ranks_fixture_is_its_launch(two_ranks):
    assert two_ranks == [(r, 2, 1, 3.0, str(r)) for r in range(2)]


def _rank1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # the others block here until they are killed or the group times out


def test_exception_carries_rank_and_traceback_and_kills_the_rest():
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank1_raises, 3, timeout=30, pg_timeout=30)
    message = str(info.value)
    assert message.startswith("rank 1 of 3 failed")
    assert "ValueError: boom on purpose" in message and "_rank1_raises" in message
    assert time.monotonic() - start < 10  # the blocked ranks were killed, not waited for


def _rank0_crashes(rank, world_size):
    if rank == 0:
        os._exit(3)
    return rank


def test_silent_crash_fails():
    with pytest.raises(DistributedTestError, match="rank 0 of 2 failed:\nexited with code 3"):
        run_distributed(_rank0_crashes, 2, timeout=30)


def _hangs(rank, world_size):
    time.sleep(600)


def test_timeout_kills_all_ranks():
    start = time.monotonic()
    expected = r"timed out after 2 s waiting for ranks \[0, 1\]"
    with pytest.raises(DistributedTestError, match=expected):
        run_distributed(_hangs, 2, timeout=2)
    assert time.monotonic() - start < 8


def test_unpicklable_result_is_an_error():
    with pytest.raises(DistributedTestError, match="pickle|Pickl"):
        run_distributed(lambda rank, world_size: (lambda: None), 2, timeout=30)


def _exits_nonzero_after_reporting(rank, world_size):
    def broken_teardown():
        raise RuntimeError("teardown fails on purpose")

    dist.destroy_process_group = broken_teardown  # only in this forked child
    return rank


def test_nonzero_exit_after_reporting_fails():
    with pytest.raises(DistributedTestError, match="reported a result but then exited with code 1"):
        run_distributed(_exits_nonzero_after_reporting, 2, timeout=30)


def _coordinate_after_a_cached_op(rank, world_size):
    """`torch.empty_like` of a DTensor on a 1-D mesh made directly (not by build_meshes): its
    mesh comes from torch's sharding-propagation cache."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    t = distribute_tensor(torch.zeros(8), mesh, [Shard(0)], src_data_rank=None)
    return torch.empty_like(t).device_mesh.get_coordinate()


def test_a_rank_does_not_inherit_the_parents_dtensor_caches():
    """The parent fills torch's DTensor caches as rank 0 of a fake group; a forked rank 1 that
    used them would get rank 0's mesh back (coordinate (0,)): the child empties them first."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        assert _coordinate_after_a_cached_op(0, 2) == (0,)
    finally:
        dist.destroy_process_group()
    assert run_distributed(_coordinate_after_a_cached_op, 2, timeout=30) == [(0,), (1,)]
