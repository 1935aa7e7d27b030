"""Two ranks under torchrun: SIGKILL after a checkpoint, resume, and get bit-identical losses
(AdamW; and Muon with QK-clip, whose momentum buffers and clipped weights the checkpoint holds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["+experiment=tiny", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.eval_every=0", "logging.progress=false", "train.deterministic=true"]
ADAMW = ("train.max_steps=18", "checkpoint.every=6")
MUON = ("train.max_steps=6", "checkpoint.every=2", "optim=muon", "optim.qk_clip_threshold=0.3")


def torchrun(run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "moetrain.train", *ARGS, f"run.dir={run_dir}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen,
    )


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


def losses(run_dir: Path) -> dict[int, tuple]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("max_attn_logit")) for r in recs}


@pytest.mark.parametrize("run", [ADAMW, MUON], ids=["adamw", "muon"])
def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, run):
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = int(run[0].split("=")[1])
    finish(torchrun(full, *run))

    proc = torchrun(killed, *run)
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
    assert saved < steps, "the run finished before it could be killed"

    finish(torchrun(killed, *run, "checkpoint.resume=auto"))
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
