"""A stop signal that arrives while a job starts is kept until the ranks can act on it: the ranks
start with it blocked and PreemptionWatcher takes it once its handler is in place; one sent to
torchrun before its ranks exist is relayed to them (moetrain.torchrun, run by launch/local.sh and
launch/slurm/train.sbatch)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from moetrain.preemption import PreemptionWatcher
from tests.harness import CHILD_ENV, TINY
from tests.launch.slurm_jobs import REPO, rank_pids, torchrun_pids

ARGS = [*TINY, "train.global_batch_size=4", "train.max_steps=30"]


def test_a_signal_to_torchrun_before_the_rank_starts_reaches_the_rank(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, **CHILD_ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["bash", str(REPO / "launch" / "local.sh"), "1", *ARGS, f"run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while not torchrun_pids(run_dir, ready=True):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.01)
    assert not rank_pids(run_dir)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun (local.sh exec'd it) only: no rank exists yet
    assert not rank_pids(run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert (run_dir / "preempted").read_text() == "step 1: received SIGTERM\n", out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"


def test_a_signal_pending_while_blocked_reaches_the_watcher_which_then_restores_the_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        # to this thread: only it blocks the signal (other threads of pytest may not)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # pending: nothing happens yet
        assert signal.SIGUSR1 in signal.sigpending()
        watcher = PreemptionWatcher()
        for _ in range(100):  # the Python-level handler runs at the next bytecode boundary
            if watcher.requested:
                break
            time.sleep(0.01)
        assert watcher.signal_name == "SIGUSR1"
        watcher.close()
        assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # blocked again
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
