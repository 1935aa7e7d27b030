"""The MoE layer: Router -> capacity (optional) -> dispatch -> GroupedExperts -> combine,
plus optional shared experts, with the aux losses injected into the backward pass.

    y = combine(experts(dispatch(x))) + [sigmoid(x . w_gate) *] shared_experts(x)
    aux = lbl.coeff * LBL + z_loss_coeff * z           (see moe/losses.py)

The aux losses never appear in the forward's outputs: `AttachAuxLoss` ties `aux` to y so that
backpropagating anything through y also backpropagates `aux_loss_scale * aux`, the factor the
trainer applies to a micro-batch's LM loss. Each training forward adds a row to the layer's step
statistics (moe/stats.py).

Who writes what: the config fixes the layer at construction; the parallel code sets the layout
once, through `use_layout` (the dispatcher, the token shards, the LBL count sum); everything
that changes from step to step (top-k, capacity factor, aux-loss scale, the step's statistics
and LBL counts, the expert bias) is set through `start_step` / `finish_step`, which only
`moetrain.model.moe.control.MoEControl` calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch import nn

from moetrain.config.schema import MoEConfig
from moetrain.model.mlp import FeedForward
from moetrain.model.moe.capacity import (
    capacity_keep_mask, expert_capacity, token_rounding_keep_mask,
)
from moetrain.model.moe.dispatcher import Exchange, TokenDispatcher
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.losses import (
    AttachAuxLoss, LoadBalancingLoss, in_backward, score_distribution, z_loss,
)
from moetrain.model.moe.router import Router
from moetrain.model.moe.stats import StatsColumns


class MoELayer(nn.Module):
    """One MoE feed-forward: x [B, S, D] -> y [B, S, D] (module docstring).

    `moe_index`: the layer's position among the full model's MoE layers; per-layer values of
    the whole model (statistics rows, the loads for the expert bias) are indexed by it, so a
    pipeline stage holding only some layers finds its own.
    """

    def __init__(self, dim: int, cfg: MoEConfig, moe_index: int = 0):
        super().__init__()
        E = cfg.num_experts
        self.moe_index = moe_index
        self.score_func = cfg.score_func
        # Round each expert's kept count to a multiple of this GEMM tile (moe/capacity.py).
        self.token_rounding = cfg.token_rounding
        self.lbl_coeff = cfg.lbl.coeff
        self.z_loss_coeff = cfg.z_loss_coeff
        self.router = Router(dim, E, cfg.top_k, cfg.score_func, cfg.norm_topk_prob, cfg.routing,
                             cfg.routed_scaling_factor)
        self.experts = GroupedExperts(E, dim, cfg.expert_hidden, kernels=cfg.kernels)
        # Null experts are routing slots: they share the load-balancing loss with real experts.
        self.lbl = LoadBalancingLoss(self.router.num_experts, cfg.lbl.scope)
        self.shared_experts: Optional[FeedForward] = None
        if cfg.num_shared_experts > 0:
            width = cfg.shared_expert_hidden or cfg.expert_hidden
            # n shared experts that every token uses == one SwiGLU of n times the width.
            self.shared_experts = FeedForward(dim, cfg.num_shared_experts * width)
        # Qwen2-MoE's per-token gate of the shared experts: sigmoid(x . w) scales their output.
        self.shared_expert_gate: Optional[nn.Linear] = None
        if cfg.num_shared_experts > 0 and cfg.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(dim, 1, bias=False)
        # The layout (`use_layout`): how expert rows move between ranks (the dispatcher's
        # exchange), and how many ranks split every micro-batch's tokens between them.
        self.dispatcher = TokenDispatcher(E, cfg.pad_to_capacity, cfg.kernels,
                                          overlap=cfg.ep_overlap)
        self.token_shards = 1
        # This step's settings (`start_step`): the config's values until a step sets them.
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.aux_loss_scale = 1.0
        self.stats_columns = StatsColumns.of(cfg)
        # Sum of the rows of this optimizer step's training forwards (moe/stats.py).
        self.register_buffer("step_stats", torch.zeros(self.stats_columns.width,
                                                       dtype=torch.float64), persistent=False)
        # A sync-free exchange's counters over this step's training forwards: forwards that
        # overflowed the budget, the largest need (factor of the balanced load), rows received,
        # receive-buffer rows (`ExchangeFlow.counters`; zeros for exact-size exchanges).
        self.register_buffer("exchange_stats", torch.zeros(4, dtype=torch.float64),
                             persistent=False)

    def use_layout(self, *, exchange: Optional[Exchange] = None,
                   token_shards: Optional[int] = None,
                   sum_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """What the layer needs from the parallel layout, set once by the parallel code before
        training; an argument left None keeps what the layer has.

        exchange: moves expert rows between the ranks holding the experts (expert parallelism's
        all-to-all; moe/dispatcher.py).
        token_shards: ranks that split every micro-batch's tokens between them (CP x TP under
        sequence parallelism); each rank's aux losses (and their statistics) are divided by it,
        so that they are this rank's share and the shares of a micro-batch SUM to its loss, like
        the gradients the data-parallel code sums. sum_counts: sums expert counts over the ranks
        holding the other tokens of the LBL's count unit (`self.lbl.counts_unit`;
        docs/load_balancing.md).
        """
        if exchange is not None:
            self.dispatcher.exchange = exchange
        if token_shards is not None:
            self.token_shards = token_shards
        if sum_counts is not None:
            self.lbl.sum_counts = sum_counts

    def start_step(self, *, top_k: int, capacity_factor: Optional[float],
                   aux_loss_scale: float, ep_budget: Optional[float] = None) -> None:
        """Set the routing of the forwards that follow (experts per token, capacity factor; None
        = dropless), the sync-free exchange's budget (None: exact sizes) and the gradient each
        micro-batch's aux loss gets (the factor of its LM loss, e.g. 1 / micro-batches of the
        step); clear the step's statistics, exchange counters and the global-scope LBL counts.
        Called by `MoEControl` only."""
        assert 1 <= top_k <= self.router.num_experts, top_k  # validated schedule
        self.configure(top_k=top_k, capacity_factor=capacity_factor, ep_budget=ep_budget)
        self.aux_loss_scale = float(aux_loss_scale)
        self.step_stats.zero_()
        self.exchange_stats.zero_()
        self.lbl.reset()

    def configure(self, *, top_k: int, capacity_factor: Optional[float],
                  ep_budget: Optional[float] = None) -> None:
        """Routing and exchange budget of the forwards that follow, the statistics kept
        (`MoEControl.evaluation`)."""
        self.top_k = int(top_k)
        self.capacity_factor = capacity_factor
        self.dispatcher.budget = ep_budget

    def finish_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """After the optimizer step: the aux-loss-free bias update from the step's global loads
        [real experts] (summed over every rank). Called by `MoEControl` only."""
        self.router.update_bias(tokens_per_expert_E)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        routing = self.router(x_TD, self.top_k)
        E = self.router.num_real_experts
        keep_TK = routing.active_TK
        if self.capacity_factor is not None:
            C = expert_capacity(x_TD.shape[0], self.top_k, E, self.capacity_factor)
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

        shared = None
        if self.shared_experts is not None:
            shared = functools.partial(self._shared, x_TD)
        # Routed experts (+ the shared experts, overlapped with the exchange where it can be).
        y_TD, exchange_counters = self.dispatcher(x_TD, routing, self.experts, shared)
        y_BSD = y_TD.view(B, S, D)

        probs_TE = score_distribution(routing.scores_TE, self.score_func)
        lbl, counts_E = self.lbl(probs_TE, routing.topk_idx_TK, B, routing.selected_TK)
        z = z_loss(routing.logits_TE)
        if self.token_shards > 1:  # local means over T/token_shards tokens -> shares
            lbl, z = lbl / self.token_shards, z / self.token_shards
        if self.training and not in_backward():  # a recompute repeats the same forward
            self._record_stats(routing, probs_TE, lbl, z, counts_E)
            if exchange_counters is not None:
                self._record_exchange(exchange_counters)
        if torch.is_grad_enabled() and (self.lbl_coeff or self.z_loss_coeff):
            aux = self.lbl_coeff * lbl + self.z_loss_coeff * z
            if aux.requires_grad:
                y_BSD = AttachAuxLoss.apply(y_BSD, aux, self.aux_loss_scale)
        return y_BSD

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    @torch.no_grad()
    def _record_exchange(self, counters: torch.Tensor) -> None:
        """Add a forward's exchange counters [overflowed, need, rows, slots] (need: max)."""
        stats = self.exchange_stats
        stats.copy_(torch.stack([stats[0] + counters[0], torch.maximum(stats[1], counters[1]),
                                 stats[2] + counters[2], stats[3] + counters[3]]))

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
        self.step_stats += self.stats_columns.row(
            lbl=lbl, z_loss=z, dropped=dropped, assignments=active, entropy=entropy, tokens=T,
            slot_counts=counts_E, prob_sum=probs_TE.sum(0))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
