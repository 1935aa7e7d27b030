"""Routing statistics of one optimizer step: per-layer expert load, balance, drops, entropy."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class RoutingAccumulator:
    """Sums the per-layer statistics of every micro-batch of a step, then reduces them once.

    `add` takes what `moetrain.model.collect_moe_stats` returns for one micro-batch (one entry per
    MoE layer). Counts are summed; the loss values are averaged over micro-batches, which is the
    weight they carry in the total loss.
    """

    def __init__(self) -> None:
        self.counts: list[torch.Tensor] | None = None  # per layer [E] int64
        # per layer [lbl, z, dropped, assignments, entropy, 1, tokens]
        self.sums: torch.Tensor | None = None
        self.micro_batches = 0
        self.slots: list[torch.Tensor] = []  # per layer [slot counts | score sums], 2 x slots

    def add(self, layer_stats: Sequence[Any]) -> None:
        if not layer_stats:
            return
        # Kept on the statistics' device: the host reads them once per step (in `summarize`),
        # not once per value and micro-batch, which would stall a GPU every micro-batch.
        counts = [s.tokens_per_expert.detach().to(torch.float64) for s in layer_stats]
        device = counts[0].device

        def column(value: Any) -> torch.Tensor:
            return torch.as_tensor(value, dtype=torch.float64, device=device)

        # Every micro-batch holds the same number of tokens, so the mean of the per-micro-batch
        # entropies (the 1 column counts them) is the mean over all tokens.
        sums = torch.stack([
            torch.stack([column(s.lbl), column(s.z_loss), column(s.dropped), column(s.assignments),
                         column(s.router_entropy), column(1.0), column(s.tokens)])
            for s in layer_stats
        ])
        # Slot counts and score sums give the step-level LBL (global scope); absent in old stats.
        slots = [torch.cat([s.slot_counts.detach().to(torch.float64),
                            s.prob_sum.detach().to(torch.float64).to(device)])
                 for s in layer_stats if getattr(s, "slot_counts", None) is not None]
        if self.counts is None:
            self.counts, self.sums, self.slots = counts, sums, slots
        else:
            self.counts = [a + b for a, b in zip(self.counts, counts)]
            self.sums = self.sums + sums
            self.slots = [a + b for a, b in zip(self.slots, slots)]
        self.micro_batches += 1

    def summarize(
        self,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        micro_batches_global: int | None = None,
        lbl_coeff: float = 1.0,
        z_coeff: float = 1.0,
        lbl_scope: str = "micro",
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Global statistics: `all_reduce` sums a tensor over the ranks holding different tokens.

        Returns the scalars for metrics.jsonl (`aux_loss` and `z_loss` weighted by their
        coefficients: what they add to the total loss) and the per-layer record for routing.jsonl.
        For the `global` LBL scope, `aux_loss` is the LBL of the whole step, E * sum_i f_i p_i
        with f and p over every token of the step (the per-micro-batch values the gradient used
        only saw the counts accumulated so far); otherwise the mean over micro-batches.
        """
        if self.counts is None:
            empty = {"aux_loss": 0.0, "z_loss": 0.0, "dropped_frac": 0.0, "load_cv": 0.0,
                     "max_load_ratio": 0.0, "router_entropy": 0.0, "experts_per_token": 0.0}
            return empty, {"layers": []}
        n_layers, n_experts = len(self.counts), self.counts[0].numel()
        parts = [torch.stack(self.counts).flatten(), self.sums.flatten()]
        if self.slots:
            parts.append(torch.stack(self.slots).flatten())
        packed = all_reduce(torch.cat(parts)).cpu()
        counts = packed[: n_layers * n_experts].view(n_layers, n_experts)
        n_sums = self.sums.numel()
        sums = packed[n_layers * n_experts: n_layers * n_experts + n_sums].view(n_layers, -1)
        slots = packed[n_layers * n_experts + n_sums:].view(n_layers, 2, -1) if self.slots else None
        mb = micro_batches_global or self.micro_batches
        mean = counts.mean(dim=1)
        # Population std over experts: the CV of a perfectly balanced layer is exactly 0.
        cv = counts.std(dim=1, unbiased=False) / mean.clamp_min(1e-12)
        max_ratio = counts.max(dim=1).values / mean.clamp_min(1e-12)
        dropped_frac = sums[:, 2] / sums[:, 3].clamp_min(1)
        entropy = sums[:, 4] / sums[:, 5].clamp_min(1)
        scalars = {
            "aux_loss": lbl_coeff * (float(sums[:, 0].sum() / mb) if lbl_scope != "global"
                                     or slots is None else _step_lbl(slots, sums[:, 6])),
            "z_loss": z_coeff * float(sums[:, 1].sum() / mb),
            "dropped_frac": float(sums[:, 2].sum() / sums[:, 3].sum().clamp_min(1)),
            "load_cv": float(cv.mean()),
            "max_load_ratio": float(max_ratio.mean()),
            "router_entropy": float(entropy.mean()),
            # Real experts a token is routed to (before capacity drops); below top_k with
            # threshold routing or null experts.
            "experts_per_token": float((sums[:, 3] / sums[:, 6].clamp_min(1)).mean()),
        }
        record = {
            "layers": [
                {"tokens_per_expert": [int(c) for c in counts[i].tolist()],
                 "load_cv": float(cv[i]), "max_load_ratio": float(max_ratio[i]),
                 "dropped_frac": float(dropped_frac[i]), "entropy": float(entropy[i]),
                 "lbl": float(sums[i, 0] / mb)}
                for i in range(n_layers)
            ]
        }
        return scalars, record


def _step_lbl(slots: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum over layers of E * sum_i f_i * p_i over all tokens of the step (slots: [L, 2, E])."""
    counts, prob_sum = slots[:, 0], slots[:, 1]
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    p = prob_sum / tokens.clamp_min(1).unsqueeze(-1)
    return float((counts.shape[-1] * (f * p).sum(-1)).sum())
