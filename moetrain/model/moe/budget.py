"""The sync-free expert exchange's receive budget (`model.moe.ep_budget`) and how it adapts.

    budget = ExchangeBudget(1.5)
    budget.factor                       # the factor the next attempt of a step uses
    redo = budget.after_attempt(overflowed=..., need=...)   # the step's reduced counters

The budget is a factor of the balanced load: with it, every (source, destination) slot of a
piece of the exchange holds ceil(factor x balanced) rows, balanced being the rows one rank would
send each EP rank if the routing were uniform (moetrain/parallel/expert_parallel.py,
`_SyncFreeFlow`). `need` is the largest rows one rank sent another, as the same factor, over
every MoE layer, micro-batch and rank of the attempt (a max over ranks in the step's reduction).

Policy, in the spirit of Megatron-Core's paged stash (re-run the step once without the budget)
but with static shapes throughout:

- an attempt that overflowed anywhere is redone (same batch: the trainer) with
  cover(need) = need x HEADROOM rounded up to a QUANTUM, and at least twice the factor that
  overflowed when a redo overflows again (a layer after the first overflow was routed from
  wrong inputs, so its need was not yet known). A slot is never larger than everything a rank
  has (the exchange bounds it), so a large enough factor cannot overflow: the redo terminates;
- after a step that fit, the factor shrinks back to max(ep_budget, cover(largest need of the
  last WINDOW steps)) - never below the configured one, which is the memory the user reserved.

Factors are multiples of QUANTUM, so a spike changes the buffer shapes (a recompile under
torch.compile, a new capture under CUDA graphs) only in steps of QUANTUM x balanced rows.
"""

from __future__ import annotations

import math
from collections import deque


class ExchangeBudget:
    """Factor of the balanced load for the sync-free exchange's slots; see the module doc."""

    QUANTUM = 0.125
    HEADROOM = 1.1
    WINDOW = 100

    def __init__(self, configured: float) -> None:
        if not configured > 0:
            raise ValueError(f"the budget must be > 0, got {configured}")
        self.configured = float(configured)
        self.factor = self.configured
        self.needs: deque[float] = deque(maxlen=self.WINDOW)
        self.overflowed_in_step = 0  # attempts of the current step that overflowed

    def cover(self, need: float) -> float:
        """The smallest multiple of QUANTUM >= need x HEADROOM."""
        return math.ceil(need * self.HEADROOM / self.QUANTUM - 1e-9) * self.QUANTUM

    def after_attempt(self, *, overflowed: bool, need: float) -> bool:
        """Adapt to an attempt's counters; True when it overflowed and must be redone (with the
        new `factor`)."""
        if overflowed:
            grown = self.cover(need)
            if self.overflowed_in_step:  # a redo overflowed again
                grown = max(grown, 2 * self.factor)
            self.factor = max(grown, self.factor + self.QUANTUM)
            self.overflowed_in_step += 1
            return True
        self.overflowed_in_step = 0
        self.needs.append(need)
        self.factor = min(self.factor, max(self.configured, self.cover(max(self.needs))))
        return False


__all__ = ["ExchangeBudget"]
