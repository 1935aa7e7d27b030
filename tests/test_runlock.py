"""One run per run directory: a live holder is named and refused, a dead one's lock taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from moetrain.runlock import LOCK_FILE, RunDirLocked, RunLock, check_free


def _hold(run_dir):
    """Another process holding the lock of `run_dir` (as a live run's rank 0 does)."""
    code = ("import sys, time; from moetrain.runlock import RunLock; "
            "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_name_and_nothing_is_written(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        before = (run / LOCK_FILE).read_text()
        for attempt in (lambda: check_free(run), lambda: RunLock(run).acquire()):
            with pytest.raises(RunDirLocked) as err:
                attempt()
            msg = str(err.value)
            assert msg.startswith(f"run.dir='{run}' is in use by another run (pid {holder.pid} on ")
            assert "choose another run.dir" in msg
        assert (run / LOCK_FILE).read_text() == before and os.listdir(run) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_a_clean_release_leaves_it_empty(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    holder.kill()  # SIGKILL: no chance to clean up; the kernel drops its flock
    holder.wait()
    check_free(run)  # free again
    lock = RunLock(run)
    previous = lock.acquire()
    assert previous.startswith(f"pid {holder.pid} on ")
    mine = json.loads((run / LOCK_FILE).read_text())
    assert mine["pid"] == os.getpid() and mine["since"] <= time.strftime("%Y-%m-%d %H:%M:%S")
    lock.release()
    assert (run / LOCK_FILE).read_text() == ""
    assert RunLock(run).acquire() is None  # after a clean end there is nothing to take over


def test_no_directory_is_free_and_not_created(tmp_path):
    check_free(tmp_path / "new")
    assert not (tmp_path / "new").exists()
