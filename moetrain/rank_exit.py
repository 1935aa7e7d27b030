"""How a training rank ends: its error reported once, and never outliving its launcher.

- `report_error`: a refused start (exit 2) or an interrupted one (exit 130) is one line.
  Under torchrun the line also goes into the rank's error file (`TORCHELASTIC_ERROR_FILE`),
  where torchrun's failure report shows it; under `python -m moetrain.torchrun` the launcher
  prints it once for all ranks (moetrain/launcher_exit.py), so no rank prints it; under plain
  torchrun rank 0 prints it (the others' lines are in torchrun's report); alone, the process
  prints it.
- `exit_with_launcher`: a rank whose launcher (torchrun's agent) is gone, however it died
  (kill -9 included: its children are re-parented and nothing tells them), exits within
  `POLL_S`, so a relaunch never meets orphans still training and writing checkpoints.
- `unblock_interrupt`: `moetrain.torchrun` blocks SIGINT so that torchrun never acts on it and
  relays it to the ranks, which inherit the block; a rank takes SIGINT again once it can report
  it (moetrain.train's `run`), as any process does: a Ctrl-C while it starts aborts it (exit
  130), once training PreemptionWatcher takes it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 0.5
#: Set by moetrain.torchrun for its ranks: it prints their error lines itself.
LAUNCHER_REPORTS = "MOETRAIN_LAUNCHER_REPORTS"
#: Set by moetrain.torchrun for its ranks: its pid (their parent is torchrun's agent, itself).
LAUNCHER_PID = "MOETRAIN_LAUNCHER_PID"
ORPHAN_EXIT_CODE = 1


def report_error(line: str) -> None:
    """Report a rank's one-line error (`error: ...`; a leading newline only on the console)
    where it will be read once (module doc)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:  # the format torchrun's ProcessFailure reads (a plain-string message)
            with open(error_file, "w") as fh:
                json.dump({"message": line.strip(), "timestamp": str(int(time.time()))}, fh)
        except OSError:
            error_file = None
    if os.environ.get(LAUNCHER_REPORTS) == "1" and error_file:
        return
    if error_file and os.environ.get("RANK", "0") != "0":
        return
    print(line, file=sys.stderr, flush=True)


def _launcher_pid() -> int | None:
    if os.environ.get(LAUNCHER_PID):
        return int(os.environ[LAUNCHER_PID])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: its agent is our parent
        return os.getppid()
    return None


def exit_with_launcher() -> None:
    """Under a launcher, start a thread that ends this process when the launcher is gone."""
    launcher = _launcher_pid()
    if launcher is None:
        return

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(POLL_S)
        log.error("the launcher (pid %d) is gone: exiting (the last complete checkpoint "
                  "stays the one to resume from)", launcher)
        logging.shutdown()
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def unblock_interrupt() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


__all__ = ["LAUNCHER_PID", "LAUNCHER_REPORTS", "exit_with_launcher", "report_error",
           "unblock_interrupt"]
