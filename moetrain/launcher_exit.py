"""What `python -m moetrain.torchrun` prints and returns when its ranks end.

torchrun (torch.distributed.run) turns any failed rank into a ChildFailedError: about 40 lines
of report and traceback and exit code 1, also for a config the ranks refused in one line each.
Here a run whose ranks refused to start (exit 2) or were interrupted (exit 130) ends like a
single process does: the ranks' distinct error lines (one, normally; from torchrun's error files,
moetrain/rank_exit.py writes them) and that exit code. Ranks that torchrun itself stopped after
the first failure (killed by a signal) do not change that. Any other failure (a crash, a rank
killed from outside) keeps torchrun's full report. A run whose ranks exit 0 (finished, or
stopped by a signal after saving a checkpoint) exits 0.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Optional

#: Exit codes a rank reports with one line (moetrain.train): a refused start, an interrupt.
ONE_LINE_CODES = (2, 130)
_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"
# The agent's lines about a failed rank and the stopping of the others; shown only for failures
# that keep torchrun's report.
_AGENT_FAILURE_LINES = ("failed (exitcode", "Sending process")


def one_line_outcome(failures: dict[int, Any]) -> Optional[tuple[int, list[str]]]:
    """(exit code, distinct error lines in rank order) when every failed rank either reported a
    one-line error or was stopped by a signal, at least one reported; None otherwise.
    `failures`: ChildFailedError.failures (global rank -> ProcessFailure)."""
    reported = [(rank, f) for rank, f in sorted(failures.items()) if f.exitcode in ONE_LINE_CODES]
    if not reported or any(f.exitcode > 0 and f.exitcode not in ONE_LINE_CODES
                           for f in failures.values()):
        return None
    code = 2 if any(f.exitcode == 2 for _, f in reported) else 130
    lines: list[str] = []
    for rank, f in reported:
        text = f.message if isinstance(f.message, str) and f.message else ""
        if f.exitcode == code and text.startswith("error:") and text not in lines:
            lines.append(text)
    return code, lines or [f"error: rank {reported[0][0]} exited with code {code} (see its log)"]


class _HoldFailureLines(logging.Filter):
    """Keeps the agent's failure lines back until the outcome says whether to show them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_AGENT_FAILURE_LINES):
            self.held.append(record)
            return False
        return True


def run_reporting(launch: Callable[[], None]) -> int:
    """Run `launch` (torchrun's `run(args)`); returns the launcher's exit code (module doc)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    agent_log = logging.getLogger(_AGENT_LOGGER)
    hold = _HoldFailureLines()
    agent_log.addFilter(hold)
    try:
        launch()
        return 0
    except ChildFailedError as err:
        outcome = one_line_outcome(err.failures)
        if outcome is None:
            agent_log.removeFilter(hold)
            for record in hold.held:
                agent_log.handle(record)
            raise
        code, lines = outcome
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return code
    finally:
        agent_log.removeFilter(hold)


__all__ = ["ONE_LINE_CODES", "one_line_outcome", "run_reporting"]
