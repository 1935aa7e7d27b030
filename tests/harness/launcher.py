"""Run a function on W gloo ranks forked from the test process (the launcher for CPU tests).

Why not torchrun or `mp.spawn`: each spawned rank re-imports torch, 15-20 s for 8 ranks on the
2-core CI machine; forking the already-imported pytest process costs ~0.3 s (docs/design.md).

    from tests.harness import run_distributed

    def check(rank, world_size, expected):        # runs in every rank, process group ready
        ...
        return something_picklable

    results = run_distributed(check, 4, expected, timeout=60)   # results[rank]
    four_ranks = ranks_fixture(check, 4, expected)              # one launch for a module's tests

Import what the ranks need (model, parallel modules) at the top of the test module, in the
parent: a module first imported inside `fn` is imported again by every forked rank.

Contract:
- every child calls `torch.set_num_threads(1)` before anything else (forked children hang in
  the intra-op thread pool otherwise), empties torch's DTensor caches (`forget_rank_caches`:
  filled in the parent, they would hand back its meshes), then sets RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT and calls `init_process_group("gloo")` with a short `pg_timeout`;
- `fn(rank, world_size, *args)` runs in each rank; `fn` and `args` are inherited through
  fork, so closures and unpicklable objects are fine; the return values come back as a list
  indexed by rank (they must be picklable);
- an exception in any rank fails the call with `DistributedTestError` whose message carries the
  rank and the full child traceback (the first failing rank's first; others follow briefly);
- a child that exits without reporting (crash, `os._exit`), or with a non-zero exit code after
  reporting, fails the call with its exit code;
- on `timeout` (seconds, whole run) or after a failure, every child still alive is killed, so a
  rank blocked in a collective never outlives the test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

# Imported here, in the parent, so that forked ranks inherit them: a module first imported inside
# fn is imported again by every rank (torch.distributed.tensor: ~0.5 s per rank on 2 cores).
import torch.distributed.device_mesh  # noqa: F401
import torch.distributed.tensor  # noqa: F401

from moetrain.parallel.mesh import forget_rank_caches

# Seconds the parent keeps collecting reports after the first failure before killing the rest:
# other ranks usually fail right after (peer closed), and their reports help diagnosis.
_GRACE_AFTER_FAILURE_S = 1.0
# Seconds a rank that has reported may take to tear down its process group and exit.
_EXIT_WAIT_S = 5.0


class DistributedTestError(AssertionError):
    """A rank raised, crashed or the run timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Fork `world_size` ranks, run `fn(rank, world_size, *args)` in each; return results by rank.

    `timeout` bounds the whole run (seconds); `pg_timeout` is the process group's timeout, so a
    collective that lost its peers fails inside the child instead of hanging; `env` is extra
    environment for the children.
    """
    ctx = mp.get_context("fork")
    reports = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, backend, pg_timeout, env or {}, reports, fn, args),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    results: dict[int, Any] = {}
    failures: list[tuple[int, str]] = []  # (rank, report), in the order they arrived
    deadline = time.monotonic() + timeout
    stop_at = deadline
    try:
        while len(results) + len(failures) < world_size and time.monotonic() < stop_at:
            if not _receive(reports, results, failures, wait=0.05):
                _collect_silent_deaths(procs, reports, results, failures)
            if failures:
                stop_at = min(stop_at, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        timed_out = len(results) + len(failures) < world_size and not failures
        if not failures and not timed_out:
            for rank, p in enumerate(procs):  # all reported; they must also exit cleanly
                p.join(timeout=max(0.0, min(_EXIT_WAIT_S, deadline - time.monotonic())))
                if p.exitcode != 0:
                    how = "did not exit" if p.exitcode is None else f"exited with code {p.exitcode}"
                    failures.append((rank, f"reported a result but then {how}"))
    finally:
        _kill_all(procs)
        reports.close()
        reports.join_thread()

    if failures:
        (rank, first), *rest = failures
        others = "".join(f"\n--- rank {r} also failed:\n{_last_line(msg)}" for r, msg in rest)
        raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{first}{others}")
    if timed_out:
        missing = sorted(set(range(world_size)) - set(results))
        raise DistributedTestError(
            f"timed out after {timeout:.0f} s waiting for ranks {missing} of {world_size} "
            "(killed all ranks)"
        )
    return [results[rank] for rank in range(world_size)]


def ranks_fixture(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any):
    """A module-scoped pytest fixture whose value is `run_distributed(fn, world_size, *args,
    **kwargs)`: one launch whose results several tests of the module check (assign it to the
    fixture's name: `four_ranks = ranks_fixture(...)`)."""

    @pytest.fixture(scope="module")
    def launch():
        return run_distributed(fn, world_size, *args, **kwargs)

    return launch


def _child(rank, world_size, port, backend, pg_timeout, env, reports, fn, args) -> None:
    torch.set_num_threads(1)  # first: forked ranks hang in the inherited thread pool otherwise
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **env,
        }
    )
    try:
        forget_rank_caches()  # the parent's DTensor caches hold its meshes (rank 0's coordinates)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args)
        # Pickle here, not in the queue's feeder thread, where a failure would be only printed.
        report = (rank, True, pickle.dumps(result))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        report = (rank, False, traceback.format_exc())
    # Report before tearing down the group: the teardown makes peers blocked in a collective
    # fail too, and the parent takes the first report to arrive as the root cause.
    reports.put(report)
    reports.close()
    reports.join_thread()
    exit_code = 0 if report[1] else 1
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - shows in the test's captured output; exit code says it
        traceback.print_exc()
        exit_code = 1
    # Skip the atexit handlers inherited from the parent (pytest's, torch's): they belong to it.
    os._exit(exit_code)


def _receive(reports, results, failures, wait: float) -> bool:
    """Take one report from the queue if one arrives within `wait` seconds."""
    try:
        rank, ok, payload = reports.get(timeout=wait)
    except queue.Empty:
        return False
    if ok:
        results[rank] = pickle.loads(payload)
    else:
        failures.append((rank, payload))
    return True


def _collect_silent_deaths(procs, reports, results, failures) -> None:
    """Record children that exited without reporting (segfault, os._exit, killed)."""
    reported = set(results) | {rank for rank, _ in failures}
    dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
    if not dead:
        return
    # A child flushes its report before it exits, so what it sent is already in the pipe.
    while _receive(reports, results, failures, wait=0.2):
        pass
    reported = set(results) | {rank for rank, _ in failures}
    for rank in dead:
        if rank not in reported:
            code = procs[rank].exitcode
            failures.append((rank, f"exited with code {code} without reporting a result"))


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
