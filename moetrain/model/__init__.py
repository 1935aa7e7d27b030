"""Plain PyTorch model modules, no process groups: moetrain.parallel applies parallelism."""

from moetrain.model.attention import Attention, causal_attention
from moetrain.model.mlp import FeedForward
from moetrain.model.moe import (
    MoELayer, MoEStats, collect_moe_stats, moe_layers, reset_lbl_accumulators, set_aux_loss_scale,
    set_capacity_factor, set_top_k, update_expert_bias,
)
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin
from moetrain.model.transformer import (
    RECOMPUTE_MODES, Transformer, TransformerBlock, count_params, set_recompute,
)

__all__ = [
    "Attention", "FeedForward", "MoELayer", "MoEStats", "RMSNorm", "Transformer",
    "TransformerBlock", "apply_rope", "causal_attention", "collect_moe_stats", "count_params",
    "moe_layers", "set_recompute", "RECOMPUTE_MODES", "reset_lbl_accumulators", "rope_cos_sin", "set_aux_loss_scale",
    "set_capacity_factor", "set_top_k", "update_expert_bias",
]
