"""In-job restarts of the worker group, for moetrain.torchrun (so launch/local.sh and
launch/slurm/train.sbatch too).

A rank that dies (kill -9, a crash, the out-of-memory killer) or hangs (moetrain.watchdog exits
75) fails the worker group; torchrun's elastic agent then stops the other ranks and starts the
group again, and the new ranks resume from the run's `checkpoints/latest`. What moetrain adds
to plain torchrun:

- `--max-restarts` defaults to 2 (torchrun's default is 0); `$MOETRAIN_MAX_RESTARTS` or an
  explicit `--max-restarts N` choose another number;
- every attempt gets a fresh rendezvous store: `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (unless
  set), so the store lives in the attempt's rank 0 and dies with it. With the store shared by
  the agent (torch's default since 2.5), restarted workers may read keys left by the previous
  attempt and hang or fail (pytorch/pytorch#135712, #167288); a fault trial on torch 2.13
  recovered 5 of 8 kills with the shared store and 6 of 6 without;
- a rank that exits 2 (a refused config, checkpoint or data: the same again on every attempt)
  ends the job without restarts; the launcher then exits 2 as well (moetrain/launcher_exit.py;
  torchrun exits 1 for any failed rank), which launch/slurm/train.sbatch reads as "do not
  requeue".
"""

from __future__ import annotations

import os
import sys

DEFAULT_MAX_RESTARTS = 2
EXIT_REFUSED = 2  # moetrain.train: a user error, reported in one line


def configure(argv: list[str]) -> list[str]:
    """Environment and arguments for torch.distributed.run; returns the arguments."""
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if not _gives_max_restarts(argv) and "PET_MAX_RESTARTS" not in os.environ:
        n = os.environ.get("MOETRAIN_MAX_RESTARTS", str(DEFAULT_MAX_RESTARTS))
        if not n.isdigit():
            print(f"error: MOETRAIN_MAX_RESTARTS={n!r} is not a whole number of restarts",
                  file=sys.stderr)
            raise SystemExit(EXIT_REFUSED)
        argv = [f"--max-restarts={n}", *argv]
    _no_restart_after_a_refusal()
    return argv


def _gives_max_restarts(argv: list[str]) -> bool:
    """Whether torchrun's own options (before the training script) set --max-restarts."""
    for arg in argv:
        if arg.startswith(("--max-restarts", "--max_restarts")):
            return True
        if not arg.startswith("-") and arg.endswith(".py"):
            return False
        if arg in ("-m", "--module"):  # the next argument is the module: options end there
            return False
    return False


def _no_restart_after_a_refusal() -> None:
    """Patch the local agent's monitor: a failure with exit code 2 uses up the restarts, so the
    agent stops the group and fails at once. The agent has no hook for this; `_monitor_workers`
    is the one place that sees each failure's exit code (torch 2.11 and 2.13 alike)."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if getattr(LocalElasticAgent._monitor_workers, "_moetrain", False):
        return
    monitor = LocalElasticAgent._monitor_workers

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if not result.is_failed():
            return result
        codes = sorted({f.exitcode for f in result.failures.values()})
        left = self._remaining_restarts
        if EXIT_REFUSED in codes:  # the ranks' one line says why (moetrain/launcher_exit.py)
            self._remaining_restarts = 0
        elif left:
            ranks = ", ".join(f"rank {r}: exit code {f.exitcode}"
                              for r, f in sorted(result.failures.items()))
            print(f"moetrain.torchrun: the worker group failed ({ranks}); restarting it "
                  f"({left} restart(s) left), the ranks resume from the latest checkpoint",
                  file=sys.stderr, flush=True)
        return result

    monitor_workers._moetrain = True  # type: ignore[attr-defined]
    LocalElasticAgent._monitor_workers = monitor_workers
