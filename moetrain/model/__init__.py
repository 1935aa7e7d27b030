"""Plain PyTorch model modules, no process groups: moetrain.parallel applies parallelism."""

from moetrain.model.attention import (
    Attention, attention_layers, causal_attention, causal_max_logits, take_max_logits,
    track_max_logits,
)
from moetrain.model.mlp import FeedForward
from moetrain.model.moe import MoEControl, MoELayer, MoEStepStats, moe_layers
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin
from moetrain.model.mtp import MTPModule, num_moe_layers
from moetrain.model.transformer import Transformer, TransformerBlock, blocks, set_recompute

__all__ = [
    "Attention", "FeedForward", "MTPModule", "MoEControl", "MoELayer", "MoEStepStats", "RMSNorm",
    "Transformer", "TransformerBlock", "apply_rope", "attention_layers", "blocks",
    "causal_attention", "causal_max_logits", "moe_layers", "num_moe_layers", "rope_cos_sin",
    "set_recompute", "take_max_logits", "track_max_logits",
]
