"""Expert capacity and token dropping.

    capacity = ceil(capacity_factor * T * k / E)      (T tokens of the local micro-batch)

Policy: each expert keeps the `capacity` assignments with the highest routing *score*
(scores[t, e], before top-k renormalisation) and drops the rest, lowest score first; equal
scores are broken by token order (earlier token kept). A dropped assignment contributes zero to
the token's output; the surviving weights are NOT renormalised (Megatron-Core's "probs" policy;
DeepSpeed's topkgating renormalises the survivors). dropped fraction = dropped / (T * k).
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Bool [T, k]: True where assignment (t, j) fits in its expert's capacity."""
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
    return (rank_A < capacity).view(T, K)
