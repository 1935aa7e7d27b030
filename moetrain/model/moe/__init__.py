"""Mixture-of-Experts pieces: router, capacity, losses, dispatcher, experts, layer."""

from moetrain.model.moe.capacity import (
    capacity_keep_mask, expert_capacity, rounded_counts, token_rounding_keep_mask,
)
from moetrain.model.moe.dispatcher import (
    DispatchHandle, Exchange, LocalExchange, PermuteHandle, TokenDispatcher,
)
from moetrain.model.moe.experts import GroupedExperts, experts_grouped, experts_loop
from moetrain.model.moe.control import MoEControl, StepRouting
from moetrain.model.moe.layer import MoELayer, moe_layers
from moetrain.model.moe.losses import (
    AttachAuxLoss, LoadBalancingLoss, counts_unit, global_lbl, score_distribution, step_lbl,
    z_loss,
)
from moetrain.model.moe.router import Router, RouterOutput
from moetrain.model.moe.stats import MoEStepStats, StatsColumns

__all__ = [
    "AttachAuxLoss", "DispatchHandle", "Exchange", "GroupedExperts", "LoadBalancingLoss",
    "LocalExchange", "MoEControl", "MoELayer", "MoEStepStats", "PermuteHandle", "Router", "RouterOutput",
    "StatsColumns", "StepRouting", "capacity_keep_mask", "counts_unit", "expert_capacity",
    "experts_grouped", "experts_loop", "global_lbl", "moe_layers", "rounded_counts",
    "score_distribution", "step_lbl", "token_rounding_keep_mask", "TokenDispatcher", "z_loss",
]
