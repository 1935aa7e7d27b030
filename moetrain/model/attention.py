"""Grouped-query causal self-attention with RoPE and optional q/k RMSNorm.

q/k norm (`qk_norm`): an RMSNorm of queries and keys before RoPE, either per head over head_dim
with one weight shared by the heads (Qwen3, "head") or over the whole projection of all heads
(OLMoE, "full"; Dehghani et al. 2023, "Scaling Vision Transformers to 22B Parameters", for
the idea).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.documents import document_attention, document_mask
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


class MaxLogitsFn(Protocol):
    """(q [B, Hq, S, d], k [B, Hkv, S, d], positions, scale, doc_positions) -> the largest
    causal logit of each query head, fp32 [Hq] (over every query and the keys it may see: in
    its document too with `doc_positions` [B, S])."""

    def __call__(self, q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, positions: torch.Tensor,
                 scale: Optional[float] = None,
                 doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor: ...


# Query rows per block of the max-logit computation: at most this many fp32 logits at once.
_MAX_LOGIT_BLOCK_ELEMENTS = 2 ** 26


def causal_max_logits(q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, q_positions: torch.Tensor,
                      scale: Optional[float] = None,
                      k_positions: Optional[torch.Tensor] = None,
                      doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The largest pre-softmax logit scale * q.k of each query head [Hq] (fp32), over every
    query and the keys it may see (k_position <= q_position; positions [S] or [B, S],
    `k_positions` default `q_positions`; with the queries' `doc_positions` [B, S] only keys of
    their own documents, `document_mask`: the logits the softmax uses). Query head h reads kv
    head h // (Hq / Hkv).

    For MuonClip (optim.qk_clip_threshold): SDPA never shows its logits, so they are computed
    again here, without gradient, in fp32 and in blocks of queries (memory bounded by
    _MAX_LOGIT_BLOCK_ELEMENTS); about the FLOPs of q k^T."""
    if k_positions is None:
        k_positions = q_positions
    B, H, S, d = q_BHSd.shape
    K, Sk = k_BKSd.shape[1], k_BKSd.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    with torch.no_grad():
        q5 = q_BHSd.detach().float().unflatten(1, (K, H // K))  # [B, K, G, S, d]
        k5 = k_BKSd.detach().float().unsqueeze(2)  # [B, K, 1, Sk, d]
        best = q5.new_full((K, H // K), float("-inf"))
        block = max(1, _MAX_LOGIT_BLOCK_ELEMENTS // max(1, B * H * Sk))
        for start in range(0, S, block):
            rows = slice(start, start + block)
            logits = torch.matmul(q5[..., rows, :], k5.transpose(-1, -2)) * scale
            if doc_positions is None:
                visible = q_positions[..., rows].unsqueeze(-1) >= k_positions.unsqueeze(-2)
            else:  # [B, 1, s, Sk]
                visible = document_mask(q_positions[..., rows], k_positions,
                                        doc_positions[..., rows])[:, 0]
            if visible.dim() == 3:  # [B, s, Sk] -> over K and G
                visible = visible[:, None, None]
            logits = logits.masked_fill(~visible, float("-inf"))
            best = torch.maximum(best, logits.amax(dim=(0, 3, 4)))
        return best.reshape(H)


class MaxLogitTracking:
    """For MuonClip: while `track_max_logits` is set and the module trains, its forward keeps
    the largest logit of each of its query heads over the step's micro-batches in
    `max_logits` ([Hq], fp32, on the device; `take_max_logits` reads and resets it).
    `max_logits_fn` sees the keys a query sees (context parallelism replaces it)."""

    track_max_logits: bool = False
    max_logits: Optional[torch.Tensor] = None
    max_logits_fn: MaxLogitsFn = staticmethod(causal_max_logits)

    def _note_max_logits(self, q_BHSd: torch.Tensor, k_BKSd: torch.Tensor,
                         positions: torch.Tensor, scale: Optional[float],
                         doc_positions: Optional[torch.Tensor] = None) -> None:
        if not (self.track_max_logits and self.training):
            return
        step_max = self.max_logits_fn(q_BHSd, k_BKSd, positions, scale,
                                      doc_positions=doc_positions)
        # An activation-checkpoint recompute gives the same values: the maximum is unchanged.
        self.max_logits = step_max if self.max_logits is None else torch.maximum(
            self.max_logits, step_max)


class Attention(MaxLogitTracking, nn.Module):
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
        self._note_max_logits(q_BSHd.transpose(1, 2), k_BSKd.transpose(1, 2), positions, None,
                              doc_positions)
        o_BHSd = self.attention_fn(
            q_BSHd.transpose(1, 2), k_BSKd.transpose(1, 2), v_BSKd.transpose(1, 2), positions,
            doc_positions=doc_positions,
        )
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))

    def qk_clip_scales(self, eta_H: torch.Tensor) -> dict[str, torch.Tensor]:
        """MuonClip's row factors of the projections (by parameter name) that scale head h's
        logits by eta_H[h] (all Hq heads of the layer, <= 1): for one kv head shared by a group
        of query heads, wk by sqrt(min eta of the group) and each wq head by eta_h / that, so
        every logit scales exactly by its eta (with one query head per kv head: both by
        sqrt(eta), Kimi K2's rule). Global row counts, whatever shards the weights."""
        d = self.head_dim
        H = eta_H.numel()
        K = self.wk.weight.shape[0] // d
        eta_k = eta_H.view(K, H // K).amin(1).sqrt()  # [K]
        eta_q = eta_H / eta_k.repeat_interleave(H // K)
        return {"wq.weight": eta_q.repeat_interleave(d), "wk.weight": eta_k.repeat_interleave(d)}


def attention_layers(model: nn.Module, n_layers: int = 0) -> list[tuple[int, nn.Module]]:
    """(layer index, attention module) of every block of `model` (under pipeline parallelism
    the rank's blocks, with their full-model indices): `layers.i` at i, and the multi-token
    prediction modules' blocks `mtp.k.block` at n_layers + k (left out while n_layers is 0)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, MaxLogitTracking):
            continue
        match = re.search(r"(?:^|\.)layers\.(\d+)\.attention$", name)
        if match:
            out.append((int(match.group(1)), module))
        match = re.search(r"(?:^|\.)mtp\.(\d+)\.block\.attention$", name)
        if match and n_layers > 0:
            out.append((n_layers + int(match.group(1)), module))
    return out


def track_max_logits(model: nn.Module, enabled: bool = True, n_layers: int = 0) -> None:
    """Keep every attention's largest logit per head during training forwards (MuonClip);
    `n_layers` as in `attention_layers`."""
    for _, module in attention_layers(model, n_layers):
        module.track_max_logits = enabled
        module.max_logits = None


def take_max_logits(model: nn.Module, n_layers: int = 0) -> list[tuple[int, torch.Tensor]]:
    """(layer index, [local query heads] largest logits since the last call) of every
    attention that ran a training forward (`attention_layers`' indices); resets them."""
    out = []
    for layer, module in attention_layers(model, n_layers):
        if module.max_logits is not None:
            out.append((layer, module.max_logits))
        module.max_logits = None
    return out
