"""Grouped-query causal self-attention with RoPE and optional q/k RMSNorm.

q/k norm (`qk_norm`): an RMSNorm of queries and keys before RoPE, either per head over head_dim
with one weight shared by the heads (Qwen3, "head") or over the whole projection of all heads
(OLMoE, "full"; Dehghani et al. 2023, "Scaling Vision Transformers to 22B Parameters", for
the idea).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.documents import document_attention
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin


class AttentionFn(Protocol):
    """(q [B, Hq, S, d_qk], k [B, Hkv, S, d_qk], v [B, Hkv, S, d_v], positions, scale,
    doc_positions) -> out [B, Hq, S, d_v]; scale None = 1 / sqrt(d_qk). positions: the tokens'
    indices in the window [S] or [B, S]; doc_positions [B, S]: their indices in their documents
    (None = one document per window; moetrain/model/documents.py)."""

    def __call__(self, q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor,
                 positions: torch.Tensor, scale: Optional[float] = None,
                 doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def causal_attention(
    q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor, positions: torch.Tensor,
    scale: Optional[float] = None, doc_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal SDPA; query head h reads kv head h // (Hq / Hkv) (`enable_gqa`, no repeated copy);
    with `doc_positions`, inside each document (`document_attention`).

    Assumes the sequence is the whole, in-order sequence. Context parallelism replaces
    `Attention.attention_fn` with a function that builds its mask from `positions`.
    """
    if doc_positions is not None:
        return document_attention(q_BHSd, k_BKSd, v_BKSd, positions, doc_positions, scale)
    return F.scaled_dot_product_attention(
        q_BHSd, k_BKSd, v_BKSd, is_causal=True, scale=scale,
        enable_gqa=q_BHSd.shape[1] != k_BKSd.shape[1],
    )


class Attention(nn.Module):
    """GQA attention with separate bias-free wq/wk/wv/wo projections.

    Head counts are derived from the projection weights at forward time (via view(..., -1, d)),
    so a tensor-parallel module whose wq/wk/wv are sharded colwise and wo rowwise works as is.
    qk_norm: "none", "head" (q_norm/k_norm weights [head_dim]) or "full" (q_norm [Hq d],
    k_norm [Hkv d]); `rope_scaling` a `RopeScalingConfig` or None.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float = 10000.0,
        qk_norm: str = "none", norm_eps: float = 1e-6, rope_scaling: Optional[Any] = None,
    ):
        super().__init__()
        assert n_heads % n_kv_heads == 0, (n_heads, n_kv_heads)  # validated config
        assert qk_norm in ("none", "head", "full"), qk_norm  # the schema's QKNorm
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.qk_norm = qk_norm
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm: Optional[RMSNorm] = None
        self.k_norm: Optional[RMSNorm] = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, norm_eps)
        self.attention_fn: AttentionFn = causal_attention

    def forward(self, x_BSD: torch.Tensor, positions: torch.Tensor,
                doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, S, D], positions [S] or [B, S] (the tokens' integer positions in the window),
        doc_positions [B, S] or None (their positions in their documents: RoPE rotates by
        these and attention stays inside each document) -> [B, S, D]."""
        B, S, _ = x_BSD.shape
        d = self.head_dim
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHd, k_BSKd = q.view(B, S, -1, d), k.view(B, S, -1, d)
        if self.qk_norm == "head":
            q_BSHd, k_BSKd = self.q_norm(q_BSHd), self.k_norm(k_BSKd)
        v_BSKd = self.wv(x_BSD).view(B, S, -1, d)
        rope_positions = positions if doc_positions is None else doc_positions
        cos, sin = rope_cos_sin(rope_positions, d, self.rope_theta, self.rope_scaling)
        q_BSHd = apply_rope(q_BSHd, cos, sin)
        k_BSKd = apply_rope(k_BSKd, cos, sin)
        o_BHSd = self.attention_fn(
            q_BSHd.transpose(1, 2), k_BSKd.transpose(1, 2), v_BSKd.transpose(1, 2), positions,
            doc_positions=doc_positions,
        )
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))
