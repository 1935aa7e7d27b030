"""Auxiliary router losses and the autograd hook that injects them into the backward pass.

    LBL = N * sum_i f_i * p_i      (Switch Transformer; Megatron-Core switch_load_balancing_loss_func)
    z   = mean_t logsumexp(logits[t, :])^2                        (ST-MoE; Megatron-Core z_loss_func)

f_i (assignment frequencies, no gradient) and p_i (mean routing probability, local gradient) per
scope (`model.moe.lbl.scope`: micro, seq, global), the sums over the ranks sharing a scope's unit
(`sum_counts`, wired by the parallel code) and the per-rank shares are defined in
docs/load_balancing.md. This module is the one place that interprets the scope: the parallel code
asks `counts_unit` which ranks' counts to sum, the metrics ask `step_lbl` what to log.

Activation checkpointing: use the non-reentrant form. Its recompute (inside backward) neither
accumulates counts nor calls `sum_counts`, and backward uses the f of the original forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from moetrain.model.moe.capacity import count_per_expert
from moetrain.model.moe.stats import MoEStepStats

#: The tokens whose expert counts one LBL value's f_i is computed from (`counts_unit`).
MICRO_BATCH, STEP = "micro_batch", "step"


def counts_unit(scope: str) -> str:
    """MICRO_BATCH for the micro and seq scopes (a micro-batch, or each of its sequences: the
    ranks splitting a micro-batch sum their counts), STEP for the global scope (every token of
    the optimizer step: every rank holding tokens of the step sums them)."""
    return STEP if scope == "global" else MICRO_BATCH


def in_backward() -> bool:
    """True while autograd executes a backward pass, i.e. during activation-checkpoint recompute.

    torch has no public flag for "this forward is a checkpoint recompute"; the engine's current
    graph-task id (-1 outside backward) is the most direct signal and works for both forms.
    Inside torch.compile it is False: the compiler traces a forward once, and a checkpoint in
    compiled code is recomputed by the compiled graph, not by running the Python forward again
    (and the id is not traceable: it would break the graph).
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def score_distribution(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """The per-token distribution over experts the LBL's p_i averages."""
    if score_func == "sigmoid":
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return scores_TE


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class _FrozenWeightSum(torch.autograd.Function):
    """sum(f * p), differentiable in p only.

    f is kept as a ctx attribute rather than a saved tensor, so non-reentrant activation
    checkpointing (which recomputes saved tensors inside backward) cannot swap in the f of a
    recompute - by then the global-scope running counts have moved on.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        ctx.f = f
        return (p * f).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.f, None


class LoadBalancingLoss(nn.Module):
    """Computes LBL for one MoE layer; holds the global-scope step accumulator.

    `sum_counts` sums local assignment counts ([E], or [B, E] for seq) over the ranks that hold
    the other tokens of the scope's unit; identity on one rank. Set through `MoELayer.use_layout`.
    """

    def __init__(self, num_experts: int, scope: str = "micro"):
        super().__init__()
        assert scope in ("micro", "seq", "global"), scope  # the schema's LBLScope refuses others
        self.num_experts = num_experts
        self.scope = scope
        self.counts_unit = counts_unit(scope)
        self.sum_counts: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.register_buffer("step_counts_E", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)

    def reset(self) -> None:
        """Clear the global-scope running counts (at the start of every optimizer step)."""
        self.step_counts_E.zero_()

    def forward(
        self, probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, batch_size: int = 1,
        selected_TK: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (LBL, local pre-drop counts [E] int64).

        `selected_TK` (threshold routing) marks the assignments a token really took; only those
        count in f_i. None = all k assignments of every token."""
        T, K = topk_idx_TK.shape
        E = self.num_experts
        ones_TK = (torch.ones_like(topk_idx_TK) if selected_TK is None
                   else selected_TK.to(topk_idx_TK.dtype))
        if self.scope == "seq":
            B = batch_size
            counts_BE = torch.zeros(B, E, dtype=torch.int64, device=topk_idx_TK.device)
            counts_BE.scatter_add_(1, topk_idx_TK.reshape(B, -1), ones_TK.reshape(B, -1))
            f_BE = self._frequencies(counts_BE)
            p_BE = probs_TE.reshape(B, -1, E).sum(1) / max(T // max(B, 1), 1)
            lbl = E * _FrozenWeightSum.apply(p_BE, f_BE / max(B, 1))
            return lbl, counts_BE.sum(0)
        counts_E = count_per_expert(topk_idx_TK, E, selected_TK)
        f_E = self._frequencies(counts_E)
        p_E = probs_TE.sum(0) / max(T, 1)
        return E * _FrozenWeightSum.apply(p_E, f_E), counts_E

    def _frequencies(self, counts: torch.Tensor) -> torch.Tensor:
        """f (fp32, no grad) from local counts: reduce, accumulate (global), normalise.

        Inside an activation-checkpoint recompute the f is not used by backward (see
        _FrozenWeightSum), so the local counts stand in: no collective, no double accumulation.
        """
        if not in_backward():
            counts = self.sum_counts(counts)
            if self.scope == "global" and self.training:
                self.step_counts_E += counts
                counts = self.step_counts_E.clone()
        return counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()


def global_lbl(slot_counts_LN: torch.Tensor, prob_sum_LN: torch.Tensor,
               tokens_L: torch.Tensor) -> torch.Tensor:
    """[L] LBL of a whole step per layer: N * sum_i f_i p_i with f from all the step's counts
    and p over all its tokens (what the global scope logs; docs/load_balancing.md)."""
    counts = slot_counts_LN.to(torch.float64)
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    p = prob_sum_LN.to(torch.float64) / tokens_L.to(torch.float64).clamp_min(1).unsqueeze(-1)
    return counts.shape[-1] * (f * p).sum(-1)


def step_lbl(stats: MoEStepStats, scope: str, micro_batches: int) -> torch.Tensor:
    """[L] the LBL of a step per layer, as logged (without its coefficient): for the global
    scope the LBL of the whole step (`global_lbl`), else the mean over the step's
    `micro_batches` (over all ranks) of each micro-batch's value."""
    if counts_unit(scope) == STEP:
        return global_lbl(stats.slot_counts, stats.prob_sum, stats.scalar("tokens"))
    return stats.scalar("lbl") / micro_batches


class AttachAuxLoss(torch.autograd.Function):
    """Identity on the hidden state; in backward, feeds the aux loss the gradient `scale`.

    So the aux losses need not be returned through the model's forward (they could not cross a
    pipeline stage boundary that carries only hidden states): backpropagating the LM loss
    through the hidden state also backpropagates scale * aux_loss.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux_loss.dtype, aux_loss.device)
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad_hidden, torch.full((), ctx.scale, dtype=dtype, device=device), None
