"""MoE routing statistics: one float64 row of sums per MoE layer and optimizer step.

Every MoE layer adds one row to its step accumulator at each training forward (not in an
activation-checkpoint recompute); the parallel code sums the rows of all layers over every rank
with one all-reduce (ranks hold other tokens or, under pipeline parallelism, other layers), and
the host reads them once per step. Rows are sums, so micro-batches, ranks and pipeline stages
combine by addition. This module is the only place that knows the columns (`StatsColumns`).

Counts are exact in float64 up to 2**53 assignments per step and layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Scalar columns, in order. lbl / z_loss: the aux-loss values without their coefficients (this
# rank's share, see MoELayer); dropped: assignments dropped by capacity or token rounding;
# assignments: active assignments to real experts (before dropping); entropy: the mean entropy
# of the routing distribution over the forward's tokens; forwards: 1 per forward; tokens: T.
SCALARS = ("lbl", "z_loss", "dropped", "assignments", "entropy", "forwards", "tokens")


@dataclass(frozen=True)
class StatsColumns:
    """Column layout of a statistics row: the scalars, then per routing slot (real and null
    experts, `num_slots`) the pre-drop assignment counts, then the summed routing distribution."""

    num_experts: int  # real experts: the first num_experts slots
    num_slots: int  # real + null experts

    @classmethod
    def of(cls, moe_cfg) -> "StatsColumns":
        """The columns of a `MoEConfig`'s layers."""
        return cls(moe_cfg.num_experts, moe_cfg.num_experts + moe_cfg.routing.num_null_experts)

    @property
    def width(self) -> int:
        return len(SCALARS) + 2 * self.num_slots

    @cached_property
    def _counts(self) -> slice:
        return slice(len(SCALARS), len(SCALARS) + self.num_slots)

    @cached_property
    def _prob_sum(self) -> slice:
        return slice(len(SCALARS) + self.num_slots, self.width)

    def row(self, *, lbl, z_loss, dropped, assignments, entropy, tokens: int,
            slot_counts: torch.Tensor, prob_sum: torch.Tensor) -> torch.Tensor:
        """One forward's row [width] (float64, on slot_counts' device, detached)."""
        device = slot_counts.device
        scalars = torch.stack([torch.as_tensor(v, device=device).detach().to(torch.float64)
                               for v in (lbl, z_loss, dropped, assignments, entropy, 1, tokens)])
        return torch.cat([scalars, slot_counts.detach().to(torch.float64),
                          prob_sum.detach().to(torch.float64)])

    def view(self, rows_LC: torch.Tensor) -> "MoEStepStats":
        return MoEStepStats(self, rows_LC)


@dataclass(frozen=True)
class MoEStepStats:
    """Rows [L, width] of the L MoE layers of the model (summed over whatever was reduced), with
    named accessors. `tokens_per_expert` etc. stay on the rows' device: reading them is a sync."""

    columns: StatsColumns
    rows_LC: torch.Tensor

    def scalar(self, name: str) -> torch.Tensor:
        """[L] sums of one scalar column (a name in SCALARS)."""
        return self.rows_LC[:, SCALARS.index(name)]

    @property
    def slot_counts(self) -> torch.Tensor:
        """[L, num_slots] int64: pre-drop assignments per routing slot."""
        return self.rows_LC[:, self.columns._counts].round().long()

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[L, num_experts] int64: pre-drop assignments per real expert (the expert load)."""
        return self.slot_counts[:, : self.columns.num_experts]

    @property
    def prob_sum(self) -> torch.Tensor:
        """[L, num_slots]: the routing distribution summed over tokens."""
        return self.rows_LC[:, self.columns._prob_sum]


__all__ = ["SCALARS", "MoEStepStats", "StatsColumns"]
