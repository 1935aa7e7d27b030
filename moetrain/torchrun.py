"""torchrun for batch jobs: a stop signal reaches the training ranks whenever it arrives.

    python -m moetrain.torchrun [torchrun options] -m moetrain.train +experiment=NAME ...

Runs torch.distributed.run (torchrun) in this process with SIGUSR1, SIGTERM and SIGINT blocked:

- the ranks inherit the block across fork and exec (SIGINT they unblock at once, like any
  process), so a stop signal sent to a rank while it is still
  starting stays pending until moetrain.preemption installs its handlers and takes it (an
  ignored signal would be lost, a default one would kill the rank);
- a signal sent to this process is passed on to every rank, including ranks started after it
  arrived: a scheduler signals the processes that exist, and early in a job that may be torchrun
  alone;
- torchrun itself never acts on these signals (its own SIGTERM handling would stop the ranks and
  exit 1): it waits for its ranks, which finish their step, save a checkpoint and exit 0.

Also, unlike plain torchrun:

- Ctrl-C (SIGINT) is relayed too, once per Ctrl-C: torchrun starts its ranks in sessions of
  their own, so the terminal's SIGINT reaches torchrun alone, which would stop the ranks and
  end in a traceback and exit 1. Relayed, the first makes the ranks finish their step, save a
  checkpoint and exit 0; a second aborts them without saving (exit 130);
- a refused start is one line and exit 2, not torchrun's report (moetrain/launcher_exit.py);
- the ranks exit within a second when this process is gone, even killed with SIGKILL
  (moetrain/rank_exit.py, `MOETRAIN_LAUNCHER_PID`);
- the worker group is restarted in-job when a rank dies or hangs (moetrain/elastic.py):
  `--max-restarts` defaults to 2 ($MOETRAIN_MAX_RESTARTS), each attempt gets a fresh rendezvous
  store, and a rank that refuses its config (exit code 2) is not restarted.

launch/local.sh and launch/slurm/train.sbatch start it; the README's multi-process commands
use it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from moetrain.launcher_exit import run_reporting
from moetrain.rank_exit import LAUNCHER_PID, LAUNCHER_REPORTS

RELAYED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Relayed once per child however often they arrive (a flag); SIGINT once per arrival (a second
# Ctrl-C aborts).
ONCE = (signal.SIGUSR1, signal.SIGTERM)
POLL_S = 0.2  # how soon a rank started after a signal receives it


def children(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (/proc/PID/task/*/children is not everywhere)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.add(int(stat.parent.name))
    return out


def relay_forever() -> None:
    """Take the relayed signals sent to this process and pass each on to every child, now and
    as children appear. Runs in its own thread; the signals must be blocked in every thread."""
    me = os.getpid()
    received: dict[signal.Signals, int] = {}  # signal -> times to deliver to each child
    sent: dict[tuple[int, int], int] = {}  # (signal, child pid) -> times delivered
    while True:
        info = signal.sigtimedwait(RELAYED, POLL_S)
        if info is not None:
            sig = signal.Signals(info.si_signo)
            received[sig] = 1 if sig in ONCE else received.get(sig, 0) + 1
        if not received:
            continue
        for pid in children(me):
            for sig, times in received.items():
                while sent.get((sig, pid), 0) < times:
                    sent[(sig, pid)] = sent.get((sig, pid), 0) + 1
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        break


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)  # before any thread or child exists
    for sig in RELAYED:  # the launcher may have ignored them until now; ranks must not inherit that
        signal.signal(sig, signal.SIG_DFL)
    threading.Thread(target=relay_forever, name="signal-relay", daemon=True).start()
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks end when this process is gone
    os.environ[LAUNCHER_REPORTS] = "1"  # their error lines are printed here, once
    from torch.distributed.run import parse_args, run

    from moetrain.elastic import configure  # in-job restarts (moetrain/elastic.py)

    args = parse_args(configure(sys.argv[1:]))
    sys.exit(run_reporting(lambda: run(args)))


if __name__ == "__main__":
    main()
