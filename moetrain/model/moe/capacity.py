"""Expert capacity, token dropping, and token rounding to the GEMM tile.

    capacity = ceil(capacity_factor * T * k / E)      (T tokens of the local micro-batch)

Policy: each expert keeps the `capacity` assignments with the highest routing *score*
(scores[t, e], before top-k renormalisation) and drops the rest, lowest score first; equal
scores are broken by token order (earlier token kept). A dropped assignment contributes zero to
the token's output; the surviving weights are NOT renormalised (Megatron-Core's "probs" policy;
DeepSpeed's topkgating renormalises the survivors). dropped fraction = dropped / (T * k).

Token rounding (`model.moe.token_rounding = tile`), after capacity, over the assignments that
are still kept. A grouped GEMM computes each expert's rows in tiles of `tile` rows; the last
tile of an expert with n rows is only (n mod tile) / tile full. Rounding makes the partial tile
either empty or worth computing, per expert, with the remainder r = n mod tile:

    r == 0          keep all n                       (already whole tiles)
    r <  tile / 2   keep n - r: drop the r lowest-score assignments of that expert
    r >= tile / 2   keep all n: the GEMM pads the last tile with r' = tile - r empty rows

So an expert keeps a multiple of the tile or all of its assignments, and at most
ceil(tile / 2) - 1 of its assignments are dropped, lowest routing score first (ties: the later
token is dropped, as for capacity). Note that an expert with fewer than tile / 2 assignments
loses all of them; `token_rounding` is meant for tiles much smaller than the mean load
T k / E. Rounding up to the next multiple with extra tokens (SonicMoE pads an expert with the
highest-scoring tokens that did not select it) would change which experts a token uses; here
rounding up only pads, so a dropless layer stays dropless for r >= tile / 2.

The rule is per expert and per call, over the local tokens: under expert parallelism every
source rank rounds its own share, so an expert's received rows are a sum of multiples of the
tile and of full counts.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


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
    counts_E = torch.bincount(expert_A, minlength=num_experts)
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
    if tile < 1:
        raise ValueError(f"model.moe.token_rounding={tile} must be a positive integer")
    rank_TK, counts_E = rank_within_expert(topk_idx_TK, priority_TK, num_experts)
    keep_E = rounded_counts(counts_E, tile)
    return rank_TK < keep_E[topk_idx_TK]
