"""Stop cleanly when asked: SIGTERM, SIGUSR1 (SLURM's advance warning) or a first Ctrl-C (SIGINT).

The handler only sets a flag; the trainer checks it after each optimizer step, agrees with the
other ranks (any rank signalled = all stop), saves a checkpoint and exits 0 so the job can be
requeued. Doing the work inside the handler would interrupt a collective half-way. A second
Ctrl-C raises KeyboardInterrupt at once: the run ends without saving (exit code 130).

launch/slurm/train.sbatch starts the ranks with these signals blocked, so one sent while a rank
is still starting stays pending; the watcher unblocks them once its handlers are in place.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
MARKER = "preempted"  # written into the run dir so launch scripts know to requeue


class PreemptionWatcher:
    def __init__(self, signals=STOP_SIGNALS, announce: bool = True) -> None:
        """announce: say on stderr what a Ctrl-C does (rank 0 only, or every rank prints it)."""
        self.signal_name: str | None = None
        self.announce = announce
        self._interrupted = False
        self._previous = {}
        self._previous_mask: set | None = None
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            # delivers a signal that arrived (blocked) during start-up to the handler just set
            self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            self._interrupted = True
            if self.announce:  # os.write: print() is not safe inside a signal handler
                os.write(sys.stderr.fileno(), b"\nCtrl-C: finishing this step, then saving a "
                         b"checkpoint and stopping (Ctrl-C again aborts without saving)\n")
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        if self._previous_mask is not None:  # blocked again before the old handlers return
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def mark_preempted(run_dir: Path, step: int, reason: str) -> None:
    (run_dir / MARKER).write_text(f"step {step}: {reason}\n")


def clear_preempted(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)
