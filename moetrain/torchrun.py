"""torchrun for batch jobs: a stop signal reaches the training ranks whenever it arrives.

    python -m moetrain.torchrun [torchrun options] -m moetrain.train +experiment=NAME ...

Runs torch.distributed.run (torchrun) in this process with SIGUSR1 and SIGTERM blocked:

- the ranks inherit the block across fork and exec, so a signal sent to a rank while it is still
  starting stays pending until moetrain.preemption installs its handlers and takes it (an
  ignored signal would be lost, a default one would kill the rank);
- a signal sent to this process is passed on to every rank, including ranks started after it
  arrived: a scheduler signals the processes that exist, and early in a job that may be torchrun
  alone;
- torchrun itself never acts on these signals (its own SIGTERM handling would stop the ranks and
  exit 1): it waits for its ranks, which finish their step, save a checkpoint and exit 0.

It also restarts the worker group in-job when a rank dies or hangs (moetrain/elastic.py):
`--max-restarts` defaults to 2 ($MOETRAIN_MAX_RESTARTS), each attempt gets a fresh rendezvous
store, and a rank that refuses its config (exit code 2) is not restarted.

launch/slurm/train.sbatch starts one of these per node.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

RELAYED = (signal.SIGUSR1, signal.SIGTERM)
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
    received: list[signal.Signals] = []
    sent: set[tuple[int, int]] = set()  # (signal, child pid)
    while True:
        info = signal.sigtimedwait(RELAYED, POLL_S)
        if info is not None and info.si_signo not in received:
            received.append(signal.Signals(info.si_signo))
        if not received:
            continue
        for pid in children(me):
            for sig in received:
                if (sig, pid) not in sent:
                    sent.add((sig, pid))
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)  # before any thread or child exists
    for sig in RELAYED:  # the launcher may have ignored them until now; ranks must not inherit that
        signal.signal(sig, signal.SIG_DFL)
    threading.Thread(target=relay_forever, name="signal-relay", daemon=True).start()
    from moetrain.elastic import run_torchrun  # in-job restarts (moetrain/elastic.py)

    run_torchrun()


if __name__ == "__main__":
    main()
