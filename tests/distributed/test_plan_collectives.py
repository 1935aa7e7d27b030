"""The planner's count of a step's collectives (moetrain/plan_comm.py) and the dry run's count
from the built model (moetrain/dryrun.py) against the collectives a real training step issues,
recorded on forked gloo ranks by `CollectiveRecorder`: every (op, group) with its calls and
bytes, on every rank, for layouts covering FSDP (2-D with TP, over EP's edp, under 1F1B /
GPipe / interleaved pipelines), replicated data parallelism, TP (GQA with q/k norms and MLA),
CP (all-gather and ring), EP and ETP, every LBL scope, recomputation, and bf16 autocast; and
multi-token prediction (`model.mtp`): an MoE MTP block under TP x EP, a dense one of depth 2
under TP, under CP with packed documents masked, on the last stage of 1F1B (with TP), GPipe (pp4, with
a tied head) and interleaved pipelines with the embedding shared between the first and the last
stage, under FSDP and bf16 autocast.

Expert-parallel all-to-alls carry the routing's rows: their calls are compared per rank and
group, their bytes summed over the world (the planner counts the balanced expectation, exact
in total; docs/planning.md, "Communication").
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

import torch.distributed.fsdp  # noqa: F401 - imported in the parent for the forked ranks
import torch.distributed.tensor.parallel  # noqa: F401 - the same
from moetrain.data import ensure_prepared
from moetrain.dryrun import dry_run
from moetrain.parallel import check_layout
from moetrain.parallel.comm_record import CollectiveRecorder
from moetrain.plan_comm import by_op_and_group, step_collectives
from tests.distributed.equivalence import layout_config
from tests.documents import documents_overrides
from tests.harness import run_distributed, trainer_for

MLA = ["model.attention=mla", "model.mla.q_lora_rank=32", "model.n_kv_heads=8"]
# (over a global batch of 4: two micro-batches or more per rank, a shorter step)
MTP1 = ("model.mtp.depth=1", "train.global_batch_size=4")
MTP2 = ("model.mtp.depth=2", "train.global_batch_size=4")
# Packed short documents, masked (tests/documents.py; expanded inside the fixture)
DOCUMENTS = ["<documents>", "data.document_mask=true"]
LAUNCHES = {
    2: {
        "tp2-recompute-full": ["parallel.tp=2", "train.recompute=full"],
        "cp2-ring-etp2": ["parallel.cp=2", "parallel.cp_comm=ring", "parallel.etp=2"],
        "replicated-ep2": ["parallel.fsdp.enabled=false", "parallel.ep=2"],
        "pp2-1f1b": ["parallel.pp=2"],
        "mtp2-dense-tp2-bf16": ["parallel.tp=2", *MTP2, "model.mtp.block=dense",
                                "train.dtype=bf16"],
        "mtp1-cp2-documents": ["parallel.cp=2", *MTP1, *DOCUMENTS],
    },
    4: {
        "tp2-ep2-seq-bf16": ["parallel.tp=2", "parallel.ep=2", "model.qk_norm=head",
                             "model.moe.lbl.scope=seq", "train.dtype=bf16"],
        "pp2-ep2": ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"],
        "mla-tp2-cp2-bf16": ["parallel.tp=2", "parallel.cp=2", *MLA, "train.dtype=bf16"],
        "cp2-tp2-ep4-global": ["parallel.cp=2", "parallel.tp=2", "parallel.ep=4",
                               "model.moe.lbl.scope=global"],
        # a tied head without MTP: the embedding shared between the stages all the same
        "gpipe-tp2-tied": ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=gpipe",
                           "model.tie_embeddings=true", "train.micro_batch_size=1"],
        "interleaved-ep2": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved",
                            "parallel.ep=2", "train.micro_batch_size=1"],
        "ep4-recompute-moe": ["parallel.ep=4", "train.recompute=moe", "train.micro_batch_size=1"],
        "zero_bubble-ep2": ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=zero_bubble",
                            "parallel.ep=2", "train.micro_batch_size=1"],
        "mtp1-tp2-ep2-bf16": ["parallel.tp=2", "parallel.ep=2", *MTP1, "train.micro_batch_size=1",
                              "train.dtype=bf16"],
        "mtp2-pp2-tp2-bf16": ["parallel.pp=2", "parallel.tp=2", "model.mtp.depth=2",
                              "train.global_batch_size=2", "train.micro_batch_size=1",
                              "train.dtype=bf16"],
        "mtp1-pp4-gpipe-tied": ["parallel.pp=4", "parallel.pp_schedule=gpipe", *MTP1,
                                "model.tie_embeddings=true", "train.micro_batch_size=1"],
        "mtp1-interleaved-dp2": ["parallel.pp=2", "parallel.vpp=2",
                                 "parallel.pp_schedule=interleaved", *MTP1,
                                 "train.micro_batch_size=1"],
    },
}
NAMES = [name for layouts in LAUNCHES.values() for name in layouts]


def _record(rank, world_size, jobs):
    """In every rank: one step to settle, then the second step under the recorder."""
    out = {}
    for name, cfg, run_dir in jobs:
        trainer = trainer_for(cfg, run_dir)
        trainer.train_step(trainer.sampler.next_step())
        with CollectiveRecorder() as rec:
            trainer.train_step(trainer.sampler.next_step())
        out[name] = rec.totals()
        del trainer
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{layout name: (config, dims, [recorded totals of rank r])} of both launches."""
    out = {}
    for world, layouts in LAUNCHES.items():
        jobs = []
        for name, overrides in layouts.items():
            overrides = [o for d in overrides
                         for o in (documents_overrides() if d == "<documents>" else [d])]
            cfg = layout_config(world, ["train.max_steps=2", *overrides])
            ensure_prepared(cfg.data, cfg.model.vocab_size)
            jobs.append((name, cfg, tmp_path_factory.mktemp(name)))
        results = run_distributed(_record, world, jobs, timeout=900)
        for name, cfg, _ in jobs:
            out[name] = (cfg, check_layout(cfg, world), [r[name] for r in results])
    return out


def _differences(expected_by_rank, recorded_by_rank, a2a_bytes: bool = True) -> list[str]:
    """Exact per (op, group) on every rank; all-to-all bytes summed over the ranks given (only
    over the whole world is that exact: `a2a_bytes` False for a subset)."""
    errors = []
    a2a = defaultdict(lambda: [0, 0])
    for rank, (expected, seen) in enumerate(zip(expected_by_rank, recorded_by_rank)):
        for key in sorted(set(expected) | set(seen)):
            e, s = expected.get(key, (0, 0)), seen.get(key, (0, 0))
            if key[0] == "all_to_all":
                a2a["expected"][0] += e[1]
                a2a["recorded"][0] += s[1]
                e, s = e[0], s[0]
            if e != s:
                errors.append(f"rank {rank} {key}: expected {e}, recorded {s}")
    if a2a_bytes and a2a["expected"] != a2a["recorded"]:
        errors.append(f"all-to-all bytes over the world: expected {a2a['expected'][0]}, "
                      f"recorded {a2a['recorded'][0]}")
    return errors


@pytest.mark.parametrize("name", [n for n in NAMES if n != "zero_bubble-ep2"])
def test_the_planner_counts_every_collective_of_a_real_step(recorded, name):
    cfg, dims, seen = recorded[name]
    planned = [by_op_and_group(step_collectives(cfg, dims, r)) for r in range(dims.world_size)]
    assert sum(len(s) for s in seen) > 0
    assert _differences(planned, seen) == []


@pytest.mark.parametrize("name", ["tp2-ep2-seq-bf16", "pp2-ep2", "mla-tp2-cp2-bf16",
                                  "interleaved-ep2", "replicated-ep2", "mtp1-tp2-ep2-bf16",
                                  "mtp2-pp2-tp2-bf16", "mtp1-pp4-gpipe-tied",
                                  "mtp1-interleaved-dp2"])
def test_the_dry_run_counts_them_from_the_built_model(recorded, name):
    cfg, dims, seen = recorded[name]
    run = dry_run(cfg, dims)
    for role in run.roles:  # the first and last rank of each stage
        assert _differences([role.comm_built], [seen[role.rank]], a2a_bytes=False) == [], role.rank


def test_zero_bubble_with_fsdp_reduces_every_unit(recorded):
    cfg, dims, seen = recorded["zero_bubble-ep2"]
    planned = [by_op_and_group(step_collectives(cfg, dims, r)) for r in range(dims.world_size)]
    assert _differences(planned, seen) == []


def test_the_recorder_sees_dtensors_shard_to_shard_all_to_all():
    """Off CPU, DTensor moves a tensor from Shard(-1) to Shard(1) (the MTP projection's output
    under TP) with one all-to-all of the rank's shard (`_dtensor.shard_dim_alltoall`); gloo
    falls back to an all-gather, which the real steps above record. LocalTensorMode takes the
    all-to-all path on CPU: the recorder counts it as the planner does off CPU."""
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with LocalTensorMode(2):
            mesh = init_device_mesh("cpu", (2,))
            x = distribute_tensor(torch.randn(2, 8, 4), mesh, [Shard(2)])
            with CollectiveRecorder() as rec:
                x.redistribute(mesh, [Shard(1)])
    finally:
        dist.destroy_process_group()
    assert rec.totals() == {("all_to_all", (0, 1)): (1, 2 * 8 * 2 * 4)}  # [2, 8, 4/2] fp32
