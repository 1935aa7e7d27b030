"""Auxiliary router losses and the autograd hook that injects them into the backward pass.

Notation: T local tokens (B sequences of S), E experts, k experts per token,
c_i = number of top-k assignments to expert i counted BEFORE capacity dropping,
s[t, :] = the router's score distribution over all experts (softmax; for sigmoid scores the
scores normalised to sum to one, as DeepSeek-V3 and Megatron-Core do).

Load-balancing loss (Switch Transformer / Megatron-Core `switch_load_balancing_loss_func`):

    LBL = E * sum_i f_i * p_i,   f_i = c_i / sum_j c_j  (= c_i / (T k)),   p_i = mean_t s[t, i]

f_i carries no gradient; p_i does. Scopes (`model.moe.lbl.scope`):

  micro   c and p over the tokens of this micro-batch.
  seq     per sequence b: f_bi from the counts of sequence b, p_bi = mean over its tokens;
          LBL = mean_b E * sum_i f_bi * p_bi  (DeepSeek-V3's sequence-wise balance loss).
  global  c = running sum, over the micro-batches of the optimizer step so far, of the counts
          reduced by `reduce_counts` (the parallel code all-reduces them over DP x CP);
          p_i stays the local mean with its local gradient. `reset()` (once per optimizer step)
          clears the running sum. Equals Megatron-Core's global_aux_loss for one rank.

`reduce_counts` (default identity) is applied to the local counts in every scope ([E], or
[B, E] for seq): the parallel code points it at a sum over the ranks holding other tokens of
the same unit (the TP ranks under sequence parallelism and the CP ranks for micro/seq; every
rank of the pipeline stage, DP x CP x TP, for global). p_i is always the LOCAL mean, so each
rank's loss is a full-size estimate and the mean over the n ranks sharing a unit equals the
loss of the whole unit (equal token counts per rank). `MoELayer` divides it by n
(`MoELayer.token_shards`), which turns the estimates into shares that SUM to the unit's loss
and its gradient - the same sum the data-parallel code applies to the router's gradients.

Router z-loss (ST-MoE; Megatron-Core `z_loss_func` without the coefficient):

    z = mean_t logsumexp(logits[t, :])^2

Activation checkpointing: use the non-reentrant form. Its recompute (inside backward) neither
accumulates counts nor calls `reduce_counts`, and backward uses the f of the original forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

SCOPES = ("micro", "seq", "global")


def in_backward() -> bool:
    """True while autograd executes a backward pass, i.e. during activation-checkpoint recompute.

    torch has no public flag for "this forward is a checkpoint recompute"; the engine's current
    graph-task id (-1 outside backward) is the most direct signal and works for both forms.
    """
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
    """Computes LBL for one MoE layer; holds the global-scope step accumulator."""

    def __init__(self, num_experts: int, scope: str = "micro"):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"model.moe.lbl.scope must be one of {SCOPES}, got {scope!r}")
        self.num_experts = num_experts
        self.scope = scope
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.register_buffer("step_counts_E", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)

    def reset(self) -> None:
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
        taken_A = topk_idx_TK.reshape(-1) if selected_TK is None else topk_idx_TK[selected_TK]
        counts_E = torch.bincount(taken_A, minlength=E)
        f_E = self._frequencies(counts_E)
        p_E = probs_TE.sum(0) / max(T, 1)
        return E * _FrozenWeightSum.apply(p_E, f_E), counts_E

    def _frequencies(self, counts: torch.Tensor) -> torch.Tensor:
        """f (fp32, no grad) from local counts: reduce, accumulate (global), normalise.

        Inside an activation-checkpoint recompute the f is not used by backward (see
        _FrozenWeightSum), so the local counts stand in: no collective, no double accumulation.
        """
        if not in_backward():
            counts = self.reduce_counts(counts)
            if self.scope == "global" and self.training:
                self.step_counts_E += counts
                counts = self.step_counts_E.clone()
        return counts.float() / counts.sum(-1, keepdim=True).clamp_min(1).float()


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
