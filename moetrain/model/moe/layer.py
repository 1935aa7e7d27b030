"""The MoE layer: Router -> capacity (optional) -> dispatch -> GroupedExperts -> combine,
plus optional shared experts, with the aux losses injected into the backward pass.

    y = combine(experts(dispatch(x))) + shared_experts(x)
    aux = lbl.coeff * LBL + z_loss_coeff * z           (see moe/losses.py)

The aux losses never appear in the forward's outputs: `AttachAuxLoss` ties `aux` to y so that
backpropagating anything through y also backpropagates `aux_loss_scale * aux`. The trainer sets
`aux_loss_scale` (via `set_aux_loss_scale`) to the factor it applies to the LM loss of a
micro-batch (e.g. 1 / number of micro-batches), so the aux losses are scaled like the LM loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moetrain.config.schema import MoEConfig
from moetrain.model.mlp import FeedForward
from moetrain.model.moe.capacity import (
    capacity_keep_mask, expert_capacity, token_rounding_keep_mask,
)
from moetrain.model.moe.dispatcher import LocalDispatcher
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.losses import (
    AttachAuxLoss, LoadBalancingLoss, in_backward, score_distribution, z_loss,
)
from moetrain.model.moe.router import Router


@dataclass
class MoEStats:
    """Detached statistics of a layer's last forward (tensors, so reading them is the only sync)."""

    lbl: torch.Tensor  # LBL value (without coefficient; this rank's share, see token_shards)
    z_loss: torch.Tensor  # z-loss value (without coefficient; likewise a share)
    tokens_per_expert: torch.Tensor  # [E] int64, local, before capacity dropping
    dropped: torch.Tensor  # int64 scalar: dropped assignments
    assignments: int | torch.Tensor  # assignments to real experts (T * k without top-p/null)
    router_entropy: torch.Tensor  # mean over tokens of the entropy of the score distribution
    tokens: int = 0  # T: assignments / tokens = real experts per token
    # For the step-level LBL of the global scope: per routing slot (real and null experts),
    # local pre-drop counts and the local sum over tokens of the score distribution.
    slot_counts: Optional[torch.Tensor] = None
    prob_sum: Optional[torch.Tensor] = None


class MoELayer(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        E = cfg.num_experts
        self.score_func = cfg.score_func
        self.capacity_factor = cfg.capacity_factor
        # Round each expert's kept count to a multiple of this GEMM tile (moe/capacity.py).
        self.token_rounding = cfg.token_rounding
        self.lbl_coeff = cfg.lbl.coeff
        self.z_loss_coeff = cfg.z_loss_coeff
        self.router = Router(dim, E, cfg.top_k, cfg.score_func, cfg.norm_topk_prob, cfg.routing)
        self.experts = GroupedExperts(E, dim, cfg.expert_hidden)
        self.dispatcher = LocalDispatcher(E, cfg.pad_to_capacity)
        # Null experts are routing slots: they share the load-balancing loss with real experts.
        self.lbl = LoadBalancingLoss(self.router.num_experts, cfg.lbl.scope)
        self.shared_experts: Optional[FeedForward] = None
        if cfg.num_shared_experts > 0:
            width = cfg.shared_expert_hidden or cfg.expert_hidden
            # n shared experts that every token uses == one SwiGLU of n times the width.
            self.shared_experts = FeedForward(dim, cfg.num_shared_experts * width)
        self.aux_loss_scale = 1.0
        # Ranks that split every micro-batch's tokens between them (TP with sequence
        # parallelism, CP); set by the parallel code. Each rank's aux losses (and their
        # statistics) are divided by it, so they are this rank's share: the shares of a
        # micro-batch SUM to its loss, like the gradients the data-parallel code sums.
        self.token_shards = 1
        # Position among the full model's MoE layers (set by the Transformer): per-layer values
        # of the whole model (e.g. the global loads for the expert bias) are indexed by it, so a
        # pipeline stage holding only some layers finds its own. None: module order.
        self.moe_index: Optional[int] = None
        self.last_stats: Optional[MoEStats] = None

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        routing = self.router(x_TD)
        E = self.router.num_real_experts
        keep_TK = routing.active_TK
        if self.capacity_factor is not None:
            C = expert_capacity(x_TD.shape[0], self.router.top_k, E, self.capacity_factor)
            priority_TK = routing.scores_TE.gather(1, routing.topk_idx_TK)
            idx_TK = routing.topk_idx_TK
            if keep_TK is not None:  # inactive assignments go to a bucket past the experts
                idx_TK = idx_TK.masked_fill(~keep_TK, E)
            fits_TK = capacity_keep_mask(idx_TK, priority_TK, E + 1, C)
            keep_TK = fits_TK if keep_TK is None else fits_TK & keep_TK
            routing = dataclasses.replace(routing, capacity=C)
        if self.token_rounding is not None:
            priority_TK = routing.scores_TE.gather(1, routing.topk_idx_TK)
            idx_TK = routing.topk_idx_TK
            if keep_TK is not None:  # dropped / inactive assignments go past the experts
                idx_TK = idx_TK.masked_fill(~keep_TK, E)
            whole_TK = token_rounding_keep_mask(idx_TK, priority_TK, E + 1, self.token_rounding)
            keep_TK = whole_TK if keep_TK is None else whole_TK & keep_TK
        routing = dataclasses.replace(routing, keep_TK=keep_TK)

        x_ND, tokens_per_expert, handle = self.dispatcher.dispatch(x_TD, routing)
        y_ND = self.experts(x_ND, tokens_per_expert)
        y_TD = self.dispatcher.combine(y_ND, handle)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        y_BSD = y_TD.view(B, S, D)

        probs_TE = score_distribution(routing.scores_TE, self.score_func)
        lbl, counts_E = self.lbl(probs_TE, routing.topk_idx_TK, B, routing.selected_TK)
        z = z_loss(routing.logits_TE)
        if self.token_shards > 1:  # local means over T/token_shards tokens -> shares
            lbl, z = lbl / self.token_shards, z / self.token_shards
        if not in_backward():  # an activation-checkpoint recompute repeats the same forward
            self._record_stats(routing, probs_TE, lbl, z, counts_E)
        if torch.is_grad_enabled() and (self.lbl_coeff or self.z_loss_coeff):
            aux = self.lbl_coeff * lbl + self.z_loss_coeff * z
            if aux.requires_grad:
                y_BSD = AttachAuxLoss.apply(y_BSD, aux, self.aux_loss_scale)
        return y_BSD

    @torch.no_grad()
    def _record_stats(self, routing, probs_TE, lbl, z, counts_E) -> None:
        T, K = routing.topk_idx_TK.shape
        # Assignments that need compute (real experts, within a top-p threshold); capacity
        # drops are counted among those.
        active = T * K if routing.active_TK is None else routing.active_TK.sum()
        if routing.keep_TK is None:
            dropped = torch.zeros((), dtype=torch.int64, device=counts_E.device)
        else:
            dropped = active - routing.keep_TK.sum()
        entropy_T = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1)
        entropy = entropy_T.mean() if T else entropy_T.sum()
        E = self.router.num_real_experts
        self.last_stats = MoEStats(lbl.detach(), z.detach(), counts_E[:E].detach(), dropped,
                                   active, entropy, T, counts_E.detach(), probs_TE.sum(0))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Gradient each MoE layer's aux loss gets in backward (the LM loss's micro-batch factor)."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = float(scale)


def collect_moe_stats(model: nn.Module) -> list[Optional[MoEStats]]:
    """The last forward's statistics of every MoE layer, in module order."""
    return [layer.last_stats for layer in moe_layers(model)]


def reset_lbl_accumulators(model: nn.Module) -> None:
    """Clear the global-scope LBL step counts; call once at the start of every optimizer step."""
    for layer in moe_layers(model):
        layer.lbl.reset()


def set_top_k(model: nn.Module, top_k: int) -> None:
    """Experts per token from the next forward on (progressive sparsification schedules)."""
    for layer in moe_layers(model):
        slots = layer.router.num_experts
        if not 1 <= top_k <= slots:
            raise ValueError(f"top_k={top_k} must lie in [1, {slots}] (model.moe.schedule.top_k)")
        layer.router.top_k = int(top_k)


def set_capacity_factor(model: nn.Module, capacity_factor: Optional[float]) -> None:
    """Capacity factor from the next forward on (None = dropless)."""
    for layer in moe_layers(model):
        layer.capacity_factor = capacity_factor


def update_expert_bias(model: nn.Module, tokens_per_expert: list[torch.Tensor]) -> None:
    """Aux-loss-free balancing step: the global [E] load of every MoE layer of the full model,
    in order; a model holding only some of them (a pipeline stage) updates its own."""
    for position, layer in enumerate(moe_layers(model)):
        index = position if layer.moe_index is None else layer.moe_index
        if index >= len(tokens_per_expert):
            raise ValueError(f"{len(tokens_per_expert)} loads, but MoE layer {index} needs one")
        layer.router.update_bias(tokens_per_expert[index])
