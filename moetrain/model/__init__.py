"""Plain PyTorch model modules, no process groups: moetrain.parallel applies parallelism."""

from moetrain.model.attention import (
    Attention, attention_layers, causal_attention, causal_max_logits, take_max_logits,
    track_max_logits,
)
from moetrain.model.mlp import FeedForward
from moetrain.model.moe import (
    MoELayer, MoEStepStats, moe_layers, moe_step_stats, set_capacity_factor, set_top_k,
    start_moe_step, update_expert_bias,
)
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin
from moetrain.model.transformer import Transformer, TransformerBlock, count_params, set_recompute

__all__ = [
    "Attention", "FeedForward", "attention_layers", "causal_max_logits", "take_max_logits",
    "track_max_logits", "MoELayer", "MoEStepStats", "RMSNorm", "Transformer",
    "TransformerBlock", "apply_rope", "causal_attention", "count_params", "moe_layers",
    "moe_step_stats", "rope_cos_sin", "set_capacity_factor", "set_recompute", "set_top_k",
    "start_moe_step", "update_expert_bias",
]
