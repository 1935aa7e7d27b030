"""Routing statistics of one optimizer step for metrics.jsonl and routing.jsonl.

Input: the step's `MoEStepStats` after the sum over every rank (moetrain/model/moe/stats.py), on
the host. Definitions of every key: docs/load_balancing.md, "Routing statistics".
"""

from __future__ import annotations

from typing import Any, Optional

from moetrain.model.moe.losses import step_lbl
from moetrain.model.moe.stats import MoEStepStats

EMPTY = {"aux_loss": 0.0, "z_loss": 0.0, "dropped_frac": 0.0, "load_cv": 0.0,
         "max_load_ratio": 0.0, "router_entropy": 0.0, "experts_per_token": 0.0}


def summarize_routing(
    stats: Optional[MoEStepStats], micro_batches: int, lbl_coeff: float, z_coeff: float,
    lbl_scope: str,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars for metrics.jsonl, per-layer record for routing.jsonl) of a step.

    `micro_batches`: the step's micro-batches over all data-parallel ranks (each one's aux
    losses carry weight 1 / micro_batches in the total loss). `aux_loss` and `z_loss` are
    weighted by their coefficients and summed over layers: what they add to the total loss;
    `aux_loss` is the step's LBL as the scope defines it (`moe.losses.step_lbl`).
    """
    if stats is None:
        return dict(EMPTY), {"layers": []}
    counts = stats.tokens_per_expert.double()
    mean = counts.mean(dim=1).clamp_min(1e-12)
    # Population std over experts: the CV of a perfectly balanced layer is exactly 0.
    cv = counts.std(dim=1, unbiased=False) / mean
    max_ratio = counts.max(dim=1).values / mean
    lbl, z = stats.scalar("lbl") / micro_batches, stats.scalar("z_loss") / micro_batches
    dropped, assignments = stats.scalar("dropped"), stats.scalar("assignments")
    tokens = stats.scalar("tokens")
    # Every forward routes the same number of tokens: the mean of its mean entropies is the
    # mean over all tokens.
    entropy = stats.scalar("entropy") / stats.scalar("forwards").clamp_min(1)
    aux = step_lbl(stats, lbl_scope, micro_batches)
    scalars = {
        "aux_loss": lbl_coeff * float(aux.sum()),
        "z_loss": z_coeff * float(z.sum()),
        "dropped_frac": float(dropped.sum() / assignments.sum().clamp_min(1)),
        "load_cv": float(cv.mean()),
        "max_load_ratio": float(max_ratio.mean()),
        "router_entropy": float(entropy.mean()),
        # Real experts a token is routed to (before capacity drops); below top_k with
        # threshold routing or null experts.
        "experts_per_token": float((assignments / tokens.clamp_min(1)).mean()),
    }
    dropped_frac = dropped / assignments.clamp_min(1)
    record = {
        "layers": [
            {"tokens_per_expert": [int(c) for c in stats.tokens_per_expert[i].tolist()],
             "load_cv": float(cv[i]), "max_load_ratio": float(max_ratio[i]),
             "dropped_frac": float(dropped_frac[i]), "entropy": float(entropy[i]),
             "lbl": float(lbl[i])}
            for i in range(counts.shape[0])
        ]
    }
    return scalars, record


__all__ = ["summarize_routing"]
