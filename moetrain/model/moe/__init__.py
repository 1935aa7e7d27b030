"""Mixture-of-Experts pieces: router, capacity, losses, dispatcher, experts, layer."""

from moetrain.model.moe.capacity import (
    capacity_keep_mask, expert_capacity, rounded_counts, token_rounding_keep_mask,
)
from moetrain.model.moe.dispatcher import DispatchHandle, LocalDispatcher, PermuteHandle
from moetrain.model.moe.experts import GroupedExperts, experts_grouped, experts_loop
from moetrain.model.moe.layer import (
    MoELayer, MoEStats, collect_moe_stats, moe_layers, reset_lbl_accumulators, set_aux_loss_scale,
    set_capacity_factor, set_top_k, update_expert_bias,
)
from moetrain.model.moe.losses import AttachAuxLoss, LoadBalancingLoss, score_distribution, z_loss
from moetrain.model.moe.router import Router, RouterOutput

__all__ = [
    "AttachAuxLoss", "DispatchHandle", "GroupedExperts", "LoadBalancingLoss", "LocalDispatcher",
    "MoELayer", "MoEStats", "PermuteHandle", "Router", "RouterOutput", "capacity_keep_mask",
    "collect_moe_stats", "expert_capacity", "experts_grouped", "experts_loop", "moe_layers",
    "reset_lbl_accumulators", "rounded_counts", "score_distribution", "set_aux_loss_scale",
    "set_capacity_factor", "set_top_k", "token_rounding_keep_mask", "update_expert_bias",
    "z_loss",
]
