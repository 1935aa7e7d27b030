"""One run per run directory: `${run.dir}/run.lock`, an exclusive `flock` held by rank 0 while
the run lives.

Two runs on one directory would overwrite each other's checkpoints and interleave their logs
and metrics. `check_free` (every rank, before anything is prepared or built; reads only) refuses
a directory whose lock is held, naming the holder (host, pid, job) recorded in the file;
`RunLock.acquire` (after the start was checked, before anything is written into the
directory) takes it. The kernel drops a `flock` when its holder dies however it dies (kill -9
included), so a leftover file with a dead holder's name is simply taken over (and logged).
Works on local file systems and on shared ones with flock support (NFSv4, Lustre with
`-o flock`); where the file system cannot lock, the run goes on and says so.

fcntl.flock rather than a pid file: a pid says nothing about another host, and a stale pid
file needs a human to remove it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from moetrain.config.validate import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# A requeued job of the same SLURM job id may start while its previous incarnation's lock is
# still released by a dying node (NFS lock recovery): it waits this long before refusing.
SAME_JOB_WAIT_S = 120.0


def _job() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"SLURM job {job}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun {run_id}" if run_id and run_id != "none" else ""


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
    except ValueError:
        return "an unknown process"
    job = f", {h['job']}" if h.get("job") else ""
    launcher = f" (launcher pid {h['launcher']})" if h.get("launcher") else ""
    return f"pid {h.get('pid')}{launcher} on {h.get('host')}{job}, since {h.get('since')}"


class RunDirLocked(ConfigError):
    """The run directory is locked by another live run; the message names the holder."""


def _locked_message(run_dir: Path, raw: str) -> str:
    return (f"run.dir={str(run_dir)!r} is in use by another run ({_holder_text(raw)}; "
            f"{run_dir / LOCK_FILE}): wait for it to end or stop it, or choose another run.dir")


def check_free(run_dir: Path) -> None:
    """Raise RunDirLocked when a live run holds `run_dir`'s lock. Writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fh = open(path, "r")
    except OSError:
        return  # no lock file (or no directory): nothing holds it
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if _same_job(fh.read()):
                return  # acquire() waits for our previous incarnation
            fh.seek(0)
            raise RunDirLocked(_locked_message(Path(run_dir), fh.read())) from None
        except OSError:
            return  # a file system without locks: acquire() says so
        fcntl.flock(fh, fcntl.LOCK_UN)


def _same_job(raw: str) -> bool:
    try:
        job = json.loads(raw).get("job")
    except ValueError:
        return False
    return bool(job) and job.startswith("SLURM") and job == _job()


class RunLock:
    """The held lock of one run directory (rank 0); `release` on exit (or the kernel does)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> Optional[str]:
        """Create the directory if needed and take the lock; returns the previous holder's
        description when it had died holding it (None otherwise). RunDirLocked when it is live."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        deadline = None
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                raw = fh.read()
                if not _same_job(raw):
                    fh.close()
                    raise RunDirLocked(_locked_message(self.path.parent, raw)) from None
                deadline = deadline or time.monotonic() + SAME_JOB_WAIT_S
                if time.monotonic() > deadline:
                    fh.close()
                    raise RunDirLocked(_locked_message(self.path.parent, raw)) from None
                time.sleep(1.0)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                fh.close()
                log.warning("cannot lock %s (%s): this file system has no locks, so a second "
                            "run on this directory would not be refused", self.path, err.strerror)
                return None
        fh.seek(0)
        previous = fh.read().strip()
        fh.seek(0)
        fh.truncate()
        launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "launcher": launcher, "job": _job(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        fh.flush()
        self._fh = fh
        return _holder_text(previous) if previous else None

    def release(self) -> None:
        """Empty the file (an empty lock file = the last run ended cleanly) and unlock."""
        if self._fh is None:
            return
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
        except OSError:
            pass
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


def lock_run_dir(run_dir: Path, rank: int, world_size: int) -> RunLock:
    """Rank 0 takes the lock (logging a takeover from a dead holder); every rank returns once
    it did, or raises the same RunDirLocked."""
    lock = RunLock(run_dir)
    outcome: list = [None]
    if rank == 0:
        try:
            previous = lock.acquire()
            if previous:
                log.info("took over %s from %s, which is no longer running", lock.path, previous)
        except RunDirLocked as err:
            outcome = [str(err)]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirLocked(outcome[0])
    return lock


__all__ = ["LOCK_FILE", "RunDirLocked", "RunLock", "check_free", "lock_run_dir"]
