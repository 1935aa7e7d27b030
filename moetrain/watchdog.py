"""Hangs found and named: collective timeouts in two phases, heartbeats, and a watchdog per rank.

Timeouts (fault.init_timeout, fault.step_timeout; torchtitan's two-phase scheme): every process
group starts with the generous one, for start-up and the first step; after the first step the
tight one applies, except around checkpoint saves, loads and evaluations, which get the
generous one again.

Heartbeats: every rank's watchdog thread writes `${run.dir}/heartbeats/rank<r>.json` (host, pid,
step, phase, wall time) every few seconds. The run directory is shared by every rank, so this
needs no process group and keeps working when any one process (rank 0 included) is stopped.

The watchdog (a daemon thread per rank, so "on each node" for all local ranks) declares a hang
when the current phase has lasted 90% of its collective timeout while some rank is behind it or
silent (it acts before gloo/NCCL raise, so it can still say who is missing; ranks all alive in
the same phase are slow, not hung, and a lone process never is), or when it has waited
`fault.heartbeat_timeout` while some rank's heartbeat is that old (a stopped or wedged
process). It then
- logs which ranks did not arrive (silent heartbeat, or behind in step/phase) to the rank's
  log, and one line on stderr from the lowest-numbered rank that is still alive;
- dumps the Python stacks of every thread of its own process into the rank's log (each local
  rank does the same; `kill -USR2 PID` dumps a live rank's stacks on demand);
- kills the silent ranks on its own host (SIGKILL: a stopped process would otherwise keep the
  launcher waiting for its grace period), and exits with EXIT_HANG, so the launcher restarts
  the worker group (moetrain.torchrun) or the job is requeued (launch/slurm/train.sbatch).
A step slower than `fault.slow_step_factor` x the median of the recent steps is logged once
with the same list of ranks, without ending anything.
"""

from __future__ import annotations

import datetime as _dt
import faulthandler
import json
import logging
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch.distributed as dist

from moetrain.config.schema import FaultConfig

log = logging.getLogger(__name__)

EXIT_HANG = 75  # EX_TEMPFAIL (sysexits.h): try again; neither success nor a refused config (2)
_ACT_AT = 0.9  # fraction of a phase's collective timeout after which the watchdog acts
_SLOW_MIN_S = 10.0  # a step shorter than this is never reported as slow (noise on tiny steps)
_RECENT = 20  # steps in the median for "slow"


def set_collective_timeout(seconds: float) -> None:
    """Set the timeout of every process group this rank belongs to (torch's private setter,
    which torchtitan uses for the same purpose; there is no public one)."""
    if not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    timeout = _dt.timedelta(seconds=seconds)
    for group in list(_world.pg_map):
        try:
            _set_pg_timeout(timeout, group)
        except (ValueError, RuntimeError, AssertionError):  # a backend without a settable timeout
            pass


class Watchdog:
    """Owns the phase a rank is in, its collective timeout, and the watchdog thread.

    The trainer calls `step(n)` before each step and wraps checkpoint saves and evaluations in
    `phase(name)`; `close()` at the end."""

    def __init__(self, cfg: FaultConfig, run_dir: Path, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.dir = Path(run_dir) / "heartbeats"
        self.log_path = Path(run_dir) / "logs" / f"rank{rank}.log"
        self.interval = max(0.5, min(5.0, cfg.heartbeat_timeout / 5))
        self._lock = threading.Lock()
        self._phase, self._step, self._since = "start", -1, time.monotonic()
        self._first_step_done = False
        self._recent: deque[float] = deque(maxlen=_RECENT)
        self._step_started: float | None = None
        self._warned_slow = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stacks: TextIO | None = None
        if cfg.watchdog:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._stacks = open(self.log_path, "a", buffering=1)  # noqa: SIM115 (process lifetime)
            faulthandler.register(signal.SIGUSR2, file=self._stacks, all_threads=True)
            self._beat()
            self._thread = threading.Thread(target=self._run, name="moetrain-watchdog", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ main thread
    def step(self, step: int) -> None:
        """Step `step` (0-based, the one about to run) starts; the previous one has finished."""
        now = time.monotonic()
        with self._lock:
            if self._step_started is not None:
                self._recent.append(now - self._step_started)
                if not self._first_step_done:
                    self._first_step_done = True
                    set_collective_timeout(self.cfg.step_timeout)
            self._phase, self._step, self._since, self._step_started = "step", step, now, now

    @contextmanager
    def phase(self, name: str):
        """A checkpoint save/load or an evaluation: the generous timeout while it lasts."""
        with self._lock:
            outer = self._phase
            self._phase, self._since = name, time.monotonic()
        set_collective_timeout(self.cfg.init_timeout)
        try:
            yield
        finally:
            now = time.monotonic()
            with self._lock:
                if self._step_started is not None:  # the phase's time is not the step's
                    self._step_started += now - self._since
                self._phase, self._since = outer, now
            if self._first_step_done:
                set_collective_timeout(self.cfg.step_timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            (self.dir / f"rank{self.rank}.json").unlink(missing_ok=True)
        if self._stacks is not None:
            faulthandler.unregister(signal.SIGUSR2)
            self._stacks.close()
            self._stacks = None

    # ------------------------------------------------------------------ watchdog thread
    def _limit(self) -> float:
        first = self._phase != "step" or not self._first_step_done
        return (self.cfg.init_timeout if first else self.cfg.step_timeout) * _ACT_AT

    def _beat(self) -> None:
        with self._lock:
            record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                      "step": self._step, "phase": self._phase, "time": time.time()}
        tmp = self.dir / f".rank{self.rank}.json.tmp"
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.dir / f"rank{self.rank}.json")
        except OSError as err:  # a full or unreachable file system must not kill training
            log.debug("heartbeat not written: %s", err)

    def _read_beats(self) -> dict[int, dict[str, Any]]:
        beats = {}
        for r in range(self.world_size):
            try:
                beats[r] = json.loads((self.dir / f"rank{r}.json").read_text())
            except (OSError, ValueError):
                pass
        return beats

    def _missing(self) -> tuple[list[str], list[dict[str, Any]]]:
        """Descriptions of the ranks this rank is waiting for, and the silent ones' records."""
        now = time.time()
        beats = self._read_beats()
        lines, silent = [], []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            b = beats.get(r)
            if b is None:
                lines.append(f"rank {r} (no heartbeat at all)")
                continue
            where = f"rank {r} ({b['host']}, pid {b['pid']}"
            age = now - b["time"]
            if age > self.cfg.heartbeat_timeout:
                lines.append(f"{where}: no heartbeat for {age:.0f} s, last seen in "
                             f"{_where(b['step'], b['phase'])})")
                silent.append(b)
            elif (b["step"], b["phase"]) != (self._step, self._phase):
                lines.append(f"{where}: alive, in {_where(b['step'], b['phase'])})")
        return lines, silent

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(min(1.0, self.interval)):
            now = time.monotonic()
            if now - last_beat >= self.interval:
                self._beat()
                last_beat = now
            with self._lock:
                phase, step, elapsed = self._phase, self._step, now - self._since
                median = statistics.median(self._recent) if self._recent else None
            if elapsed > self._limit():
                # A long phase is a hang only while this rank waits for another one; ranks all
                # alive in the same phase are slow, not hung (a big step, a loaded host, one
                # process alone), and a collective that does hang still raises at its timeout.
                lines, silent = self._missing()
                if lines:
                    self._hang(f"{_where(step, phase)} has not finished after {elapsed:.0f} s "
                               f"(90% of its collective timeout, {self._limit() / _ACT_AT:.0f} s)",
                               lines, silent)
            if elapsed > self.cfg.heartbeat_timeout:
                lines, silent = self._missing()
                if silent:
                    self._hang(f"{_where(step, phase)} has waited {elapsed:.0f} s for ranks "
                               "whose heartbeat stopped", lines, silent)
            if (phase == "step" and median is not None and step != self._warned_slow
                    and elapsed > max(_SLOW_MIN_S, self.cfg.slow_step_factor * median)):
                self._warned_slow = step
                lines, _ = self._missing()
                log.warning("step %d is slow: %.0f s so far, the median of recent steps is %.2f s; "
                            "waiting for: %s", step + 1, elapsed, median,
                            "; ".join(lines) or "no rank is behind (this rank is slow itself?)")

    def _hang(self, what: str, lines: list[str] | None = None,
              silent: list[dict[str, Any]] | None = None) -> None:
        if lines is None:
            lines, silent = self._missing()
        who = "; ".join(lines) or "every other rank is alive and in the same phase"
        message = (f"hang detected by rank {self.rank}: {what}; ranks not arriving: {who}. "
                   f"Stacks of this rank are in {self.log_path}; exiting with code {EXIT_HANG} "
                   "so that the launcher restarts the workers or the job is requeued")
        log.error(message)
        silent_ranks = {b["rank"] for b in silent or []}
        alive = [r for r in range(self.world_size) if r not in silent_ranks]
        if self.rank != 0 and alive and alive[0] == self.rank:  # rank 0 logs to the console
            print(f"error: {message}", file=sys.stderr, flush=True)
        if self._stacks is not None:
            self._stacks.write(f"--- Python stacks of rank {self.rank} (pid {os.getpid()}) at the hang\n")
            self._stacks.flush()
            faulthandler.dump_traceback(file=self._stacks, all_threads=True)
        host = socket.gethostname()
        for b in silent or []:
            if b["host"] == host and _is_rank_process(b["pid"]):
                try:
                    os.kill(b["pid"], signal.SIGKILL)
                    log.error("killed rank %d (pid %d), which did not respond", b["rank"], b["pid"])
                except OSError:
                    pass
        for handler in logging.getLogger("moetrain").handlers:
            handler.flush()
        os._exit(EXIT_HANG)


def _where(step: int, phase: str) -> str:
    """`step` is 0-based: the step running, or the last one run before a checkpoint/eval."""
    if phase == "step":
        return f"step {step + 1}"
    return "start-up" if phase == "start" else f"the {phase} after step {step + 1}"


def _is_rank_process(pid: int) -> bool:
    """pid is still a moetrain training process (not a recycled pid)."""
    try:
        return b"moetrain.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
