"""Mixture-of-Experts pieces: router, capacity, losses, dispatcher, experts, layer."""

from moetrain.model.moe.capacity import (
    capacity_keep_mask, expert_capacity, rounded_counts, token_rounding_keep_mask,
)
from moetrain.model.moe.dispatcher import DispatchHandle, LocalDispatcher, PermuteHandle
from moetrain.model.moe.experts import GroupedExperts, experts_grouped, experts_loop
from moetrain.model.moe.layer import (
    MoELayer, moe_layers, moe_step_stats, set_capacity_factor, set_top_k, start_moe_step,
    update_expert_bias,
)
from moetrain.model.moe.losses import (
    AttachAuxLoss, LoadBalancingLoss, global_lbl, score_distribution, z_loss,
)
from moetrain.model.moe.router import Router, RouterOutput
from moetrain.model.moe.stats import MoEStepStats, StatsColumns

__all__ = [
    "AttachAuxLoss", "DispatchHandle", "GroupedExperts", "LoadBalancingLoss", "LocalDispatcher",
    "MoELayer", "MoEStepStats", "PermuteHandle", "Router", "RouterOutput", "StatsColumns",
    "capacity_keep_mask", "expert_capacity", "experts_grouped", "experts_loop", "global_lbl",
    "moe_layers", "moe_step_stats", "rounded_counts", "score_distribution",
    "set_capacity_factor", "set_top_k", "start_moe_step", "token_rounding_keep_mask",
    "update_expert_bias", "z_loss",
]
