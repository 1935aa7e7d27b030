"""Two ranks under torchrun: SIGKILL after a checkpoint, resume, and get bit-identical losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import start_train, torchrun

pytestmark = pytest.mark.slow


def two_ranks(run_dir: Path, *extra: str) -> subprocess.Popen:
    """18 steps of a global batch of 4 on 2 ranks under torchrun, a checkpoint every 6."""
    return start_train(["train.global_batch_size=4", "train.max_steps=18", "checkpoint.every=6",
                        f"run.dir={run_dir}", *extra], launcher=torchrun(2),
                       stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_sigkill_after_the_step_6_checkpoint_then_resume_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    finish(two_ranks(full))

    proc = two_ranks(killed)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:  # the ranks and torchrun: no chance to clean up
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved < 18, "the run finished before it could be killed"

    finish(two_ranks(killed, "checkpoint.resume=auto"))
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 19))
    assert all(a[s] == b[s] for s in range(1, 19)), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
