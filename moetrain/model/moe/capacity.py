"""Expert capacity, token dropping, and token rounding to the GEMM tile.

    capacity = ceil(capacity_factor * T * k / E)      (T tokens of the local micro-batch)

Each expert keeps its `capacity` highest-score assignments (ties: the earlier token), the rest
add zero and the survivors are not renormalised (Megatron-Core's "probs" policy). Token rounding
then keeps, per expert, a multiple of the tile or all of its assignments (remainder r < tile/2:
drop the r lowest-score ones). Both decide over the rank's own tokens. The policies and their
edge cases: docs/load_balancing.md ("Capacity and token rounding"), docs/features/token_rounding.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def count_per_expert(expert_A: torch.Tensor, num_experts: int,
                     taken_A: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Assignments per expert, [num_experts] int64, of expert ids `expert_A` (any shape; ids in
    [0, num_experts)), counting only where `taken_A` (same shape, bool) is true if given.

    A scatter-add rather than torch.bincount: bincount sizes its output from the largest id,
    which on a GPU is a device-to-host sync per call."""
    ones = (torch.ones_like(expert_A) if taken_A is None else taken_A.to(expert_A.dtype))
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_A.device)
    return counts.scatter_add_(0, expert_A.reshape(-1), ones.reshape(-1).to(torch.int64))


def rank_within_expert(
    topk_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank [T, k], counts [num_experts]): each assignment's position among its expert's
    assignments by descending priority (0 = highest; ties: earlier token first), and the
    number of assignments per expert."""
    T, K = topk_idx_TK.shape
    expert_A = topk_idx_TK.reshape(-1)
    # Sort by priority (descending; stable, so ties keep token order), then by expert (stable,
    # so each expert's assignments stay in priority order).
    by_priority_A = torch.argsort(priority_TK.detach().reshape(-1), descending=True, stable=True)
    order_A = by_priority_A[torch.argsort(expert_A[by_priority_A], stable=True)]
    counts_E = count_per_expert(expert_A, num_experts)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_A = torch.empty_like(expert_A)
    rank_A[order_A] = torch.arange(T * K, device=expert_A.device) - start_E[expert_A[order_A]]
    return rank_A.view(T, K), counts_E


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Bool [T, k]: True where assignment (t, j) fits in its expert's capacity."""
    rank_TK, _ = rank_within_expert(topk_idx_TK, priority_TK, num_experts)
    return rank_TK < capacity


def rounded_counts(counts_E: torch.Tensor, tile: int) -> torch.Tensor:
    """Assignments each expert keeps under token rounding (module docstring)."""
    remainder_E = counts_E % tile
    round_down_E = 2 * remainder_E < tile  # r < tile / 2, exact in integers
    return torch.where(round_down_E, counts_E - remainder_E, counts_E)


def token_rounding_keep_mask(
    topk_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, tile: int
) -> torch.Tensor:
    """Bool [T, k]: True where assignment (t, j) survives rounding its expert's count to `tile`.

    Every assignment of `topk_idx_TK` counts; pass assignments that are already dropped or
    inactive as an extra expert id (e.g. `num_experts`, with num_experts + 1) and AND the result
    with the existing keep mask.
    """
    assert tile >= 1, tile  # validated config (model.moe.token_rounding)
    rank_TK, counts_E = rank_within_expert(topk_idx_TK, priority_TK, num_experts)
    keep_E = rounded_counts(counts_E, tile)
    return rank_TK < keep_E[topk_idx_TK]
