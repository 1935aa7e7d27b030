"""Grouped-query causal self-attention with RoPE."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.rope import apply_rope, rope_cos_sin

# (q [B, Hq, S, d], k [B, Hkv, S, d], v [B, Hkv, S, d], positions) -> out [B, Hq, S, d]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal_attention(
    q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Causal SDPA; query head h reads kv head h // (Hq / Hkv) (`enable_gqa`, no repeated copy).

    Assumes the sequence is the whole, in-order sequence (positions unused). Context parallelism
    replaces `Attention.attention_fn` with a function that builds its mask from `positions`.
    """
    return F.scaled_dot_product_attention(
        q_BHSd, k_BKSd, v_BKSd, is_causal=True, enable_gqa=q_BHSd.shape[1] != k_BKSd.shape[1]
    )


class Attention(nn.Module):
    """GQA attention with separate bias-free wq/wk/wv/wo projections.

    Head counts are derived from the projection weights at forward time (via view(..., -1, d)),
    so a tensor-parallel module whose wq/wk/wv are sharded colwise and wo rowwise works as is.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float = 10000.0
    ):
        super().__init__()
        assert n_heads % n_kv_heads == 0, (n_heads, n_kv_heads)  # validated config
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.attention_fn: AttentionFn = causal_attention

    def forward(self, x_BSD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], positions [S] or [B, S] (integer token positions) -> [B, S, D]."""
        B, S, _ = x_BSD.shape
        d = self.head_dim
        q_BSHd = self.wq(x_BSD).view(B, S, -1, d)
        k_BSKd = self.wk(x_BSD).view(B, S, -1, d)
        v_BSKd = self.wv(x_BSD).view(B, S, -1, d)
        cos, sin = rope_cos_sin(positions, d, self.rope_theta)
        q_BSHd = apply_rope(q_BSHd, cos, sin)
        k_BSKd = apply_rope(k_BSKd, cos, sin)
        o_BHSd = self.attention_fn(
            q_BSHd.transpose(1, 2), k_BSKd.transpose(1, 2), v_BSKd.transpose(1, 2), positions
        )
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))
