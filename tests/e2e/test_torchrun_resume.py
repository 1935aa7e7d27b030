"""Two ranks under the README's launcher: SIGKILL of the launcher alone after a checkpoint ends
every rank within seconds (no orphan keeps training and writing); the relaunch takes the dead
run's lock over, resumes, and gets bit-identical losses (AdamW; and Muon with QK-clip, whose
momentum buffers and clipped weights the checkpoint holds, with bit-identical largest logits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moetrain.torchrun import children
from tests.harness import start_train, torchrun

pytestmark = pytest.mark.slow


ADAMW = ("train.max_steps=18", "checkpoint.every=6")
MUON = ("train.max_steps=6", "checkpoint.every=2", "optim=muon", "optim.qk_clip_threshold=0.3")


def two_ranks(run_dir: Path, run: tuple[str, ...], *extra: str) -> subprocess.Popen:
    """`run` (steps, checkpoint interval, optimizer) with a global batch of 4 on 2 ranks under
    moetrain.torchrun (the README's launcher)."""
    return start_train(["train.global_batch_size=4", *run, f"run.dir={run_dir}", *extra],
                       launcher=torchrun(2, relay=True), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def losses(run_dir: Path) -> dict[int, tuple]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("max_attn_logit")) for r in recs}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (nobody reaps an orphan's child at once)


@pytest.mark.parametrize("run", [ADAMW, MUON], ids=["adamw", "muon"])
def test_sigkill_of_the_launcher_ends_its_ranks_and_the_relaunch_resumes_bit_identically(
        tmp_path, run):
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = int(run[0].split("=")[1])
    finish(two_ranks(full, run))

    proc = two_ranks(killed, run)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    ranks = sorted(children(proc.pid))  # torchrun's agent runs in the launcher's process
    assert len(ranks) == 2, ranks
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: nothing tells its ranks
    killed_at = time.monotonic()
    proc.communicate()
    while any(alive(pid) for pid in ranks) and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    gone_after = time.monotonic() - killed_at
    print(f"ranks gone {gone_after:.2f} s after the launcher's SIGKILL")
    assert not any(alive(pid) for pid in ranks), "ranks outlived their launcher by 10 s"
    saved = int(latest.read_text().strip().split("_")[1])
    assert saved < steps, "the run finished before it could be killed"
    # (the first rank to notice exits; the other may instead see its collective fail)
    assert any("the launcher (pid" in (killed / "logs" / f"rank{r}.log").read_text() for r in (0, 1))

    # Rank 0 died holding the run lock (its watcher's exit), or - when rank 1 noticed first and
    # rank 0's collective failed - released it on its way out (an empty lock file).
    held = (killed / "run.lock").read_text().strip()
    finish(two_ranks(killed, run, "checkpoint.resume=auto"))
    log0 = (killed / "logs" / "rank0.log").read_text()
    assert ("which is no longer running" in log0) == bool(held), (held, log0[-3000:])  # took over
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, steps + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
