"""Decoder-only MoE transformer: pre-norm blocks of attention and a dense or MoE feed-forward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import ModelConfig, head_dim_of
from moetrain.model.attention import Attention
from moetrain.model.init import init_parameters
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
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        dense = layer_id < cfg.moe.first_dense_layers
        self.mlp = FeedForward(cfg.d_model, cfg.ffn_hidden) if dense else None
        # MoE layers are the blocks from first_dense_layers on, numbered from 0.
        self.moe = (None if dense else
                    MoELayer(cfg.d_model, cfg.moe, moe_index=layer_id - cfg.moe.first_dense_layers))
        # Activation recomputation: "none", "moe" (the MoE layer) or "full" (the whole block);
        # set by `set_recompute` (train.recompute).
        self.recompute = "none"

    def forward(self, x_BSD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BSD, positions, use_reentrant=False)
        return self._forward(x_BSD, positions)

    def _forward(self, x_BSD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), positions)
        ffn_in_BSD = self.ffn_norm(h_BSD)
        if self.moe is None:
            return h_BSD + self.mlp(ffn_in_BSD)
        if self.recompute == "moe" and torch.is_grad_enabled():
            # The routed experts' intermediates (k x tokens x expert_hidden) dominate activation
            # memory in MoE blocks; recomputing just the MoE layer frees them for one extra pass.
            return h_BSD + checkpoint(self.moe, ffn_in_BSD, use_reentrant=False)
        return h_BSD + self.moe(ffn_in_BSD)


class Transformer(nn.Module):
    """tokens [B, S] (or hidden states [B, S, D] on a later pipeline stage) -> logits [B, S, V].

    `tok_embeddings`, `norm` and `output` may be set to None (pipeline stages), and entries of
    the `layers` ModuleDict (keys "0".."n_layers-1", kept when others are deleted) removed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """positions: [S] or [B, S] integer positions; default 0..S-1."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        for layer in self.layers.values():
            h = layer(h, positions)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise the weights this module holds (moetrain/model/init.py has the rules and
        the counter-based generator: values depend only on the seed, the parameter's name and
        the element's global index, so pipeline stages and shards get one process's values).

        seed=None draws the seed from the global torch RNG, so `torch.manual_seed(s);
        Transformer(cfg)` is reproducible. On the meta device there is nothing to initialise
        (the trainer initialises each rank's shards once they are allocated).
        """
        if all(p.is_meta for p in self.parameters()):
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        init_parameters(self, self.cfg, seed)


def set_recompute(model: nn.Module, mode: str) -> None:
    """Recompute activations in backward instead of keeping them (`train.recompute`:
    none | moe | full, the schema's Recompute)."""
    assert mode in ("none", "moe", "full"), mode
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.recompute = mode


__all__ = ["Transformer", "TransformerBlock", "set_recompute"]
