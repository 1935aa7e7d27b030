"""The transformer block: pre-norm attention and a dense or MoE feed-forward, residual around
each; used by the main model's layers and by the multi-token-prediction modules."""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import ModelConfig, head_dim_of
from moetrain.model.attention import Attention
from moetrain.model.mla import MultiHeadLatentAttention
from moetrain.model.mlp import FeedForward
from moetrain.model.moe.layer import MoELayer
from moetrain.model.norm import RMSNorm


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The attention of `model.attention`: GQA (with `model.qk_norm`) or MLA (`model.mla`)."""
    scaling = cfg.rope_scaling if cfg.rope_scaling.kind != "none" else None
    if cfg.attention == "mla":
        return MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.mla, cfg.rope_theta, scaling)
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim_of(cfg), cfg.rope_theta,
                     cfg.qk_norm, cfg.norm_eps, scaling)


class TransformerBlock(nn.Module):
    """x [B, S, D] -> x + attention(norm(x)) = h -> h + ffn(norm(h)).

    `moe_index`: None for a dense SwiGLU MLP (`model.ffn_hidden`), else an MoE layer of
    `model.moe` with that index among the whole model's MoE layers (its statistics row).
    """

    def __init__(self, cfg: ModelConfig, *, moe_index: Optional[int]):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        dense = moe_index is None
        self.mlp = FeedForward(cfg.d_model, cfg.ffn_hidden) if dense else None
        self.moe = None if dense else MoELayer(cfg.d_model, cfg.moe, moe_index=moe_index)
        # Activation recomputation: "none", "moe" (the MoE layer) or "full" (the whole block);
        # set by `set_recompute` (train.recompute).
        self.recompute = "none"

    def forward(self, x_BSD: torch.Tensor, positions: torch.Tensor,
                doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions [S] or [B, S]: window positions; doc_positions [B, S] or None: positions
        inside the documents (moetrain/model/documents.py)."""
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BSD, positions, doc_positions, use_reentrant=False)
        return self._forward(x_BSD, positions, doc_positions)

    def _forward(self, x_BSD: torch.Tensor, positions: torch.Tensor,
                 doc_positions: Optional[torch.Tensor]) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), positions,
                                       doc_positions=doc_positions)
        ffn_in_BSD = self.ffn_norm(h_BSD)
        if self.moe is None:
            return h_BSD + self.mlp(ffn_in_BSD)
        if self.recompute == "moe" and torch.is_grad_enabled():
            # The routed experts' intermediates (k x tokens x expert_hidden) dominate activation
            # memory in MoE blocks; recomputing just the MoE layer frees them for one extra pass.
            return h_BSD + checkpoint(self.moe, ffn_in_BSD, use_reentrant=False)
        return h_BSD + self.moe(ffn_in_BSD)


def blocks(model: nn.Module) -> Iterator[TransformerBlock]:
    """The transformer blocks `model` holds (a Transformer, a pipeline stage): its layers in
    order, then its multi-token-prediction modules' blocks. The parallel code applies its
    per-block plans (TP, FSDP units, compilation) to these."""
    layers = getattr(model, "layers", None)
    if layers is not None:
        yield from layers.values()
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        for module in mtp.values():
            yield module.block


def set_recompute(model: nn.Module, mode: str) -> None:
    """Recompute activations in backward instead of keeping them (`train.recompute`:
    none | moe | full, the schema's Recompute)."""
    assert mode in ("none", "moe", "full"), mode
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.recompute = mode


__all__ = ["TransformerBlock", "blocks", "build_attention", "set_recompute"]
