"""Multi-head latent attention (MLA), DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3.

    q        = wq x                      or  wq_b q_a_norm(wq_a x)     [B, S, H, d_nope + d_rope]
    c_kv     = kv_a_norm(wkv_a x)                                      [B, S, kv_lora_rank]
    k_nope,v = wkv_b c_kv                                              [B, S, H, d_nope], [.., d_v]
    k_rope   = RoPE(wk_rope x)           one head, shared by every query head  [B, S, 1, d_rope]
    q_rope   = RoPE(q[..., d_nope:])
    out      = wo attention([q_nope, q_rope], [k_nope, k_rope], v; scale)
    scale    = (d_nope + d_rope)^-1/2 * mscale(factor, mscale_all_dim)^2  (the latter with YaRN)

Keys and values are rebuilt from the latent per head (no absorbed-weight inference path: this
is the training form). DeepSeek's checkpoints hold wkv_a and wk_rope as one matrix
(`kv_a_proj_with_mqa`); they are separate here so tensor parallelism can keep the shared
rotary key replicated while the heads are split (moetrain/parallel/tensor_parallel.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from moetrain.model.attention import AttentionFn, MaxLogitTracking, causal_attention
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, rope_cos_sin, yarn_mscale

# DeepSeek's reference and Hugging Face build the latent norms with the default eps, whatever
# rms_norm_eps says; so does moetrain, so imported models compute the same.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(mla: Any, rope_scaling: Optional[Any]) -> float:
    """The attention logits' scale of an `MLAConfig` (module docstring)."""
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if rope_scaling is not None and rope_scaling.kind != "none" and rope_scaling.mscale_all_dim:
        scale *= yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) ** 2
    return scale


class MultiHeadLatentAttention(MaxLogitTracking, nn.Module):
    """MLA over x [B, S, D] with explicit positions; `mla` is an `MLAConfig`, `rope_scaling` a
    `RopeScalingConfig` or None. Head counts are read from the weights at forward time, so a
    tensor-parallel module (wq/wq_b/wkv_b colwise, wo rowwise) works as is."""

    def __init__(self, dim: int, n_heads: int, mla: Any, rope_theta: float = 10000.0,
                 rope_scaling: Optional[Any] = None):
        super().__init__()
        self.d_nope, self.d_rope, self.d_v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.softmax_scale = mla_softmax_scale(mla, rope_scaling)
        d_qk = self.d_nope + self.d_rope
        self.wq: Optional[nn.Linear] = None
        self.wq_a: Optional[nn.Linear] = None
        self.q_a_norm: Optional[RMSNorm] = None
        self.wq_b: Optional[nn.Linear] = None
        if mla.q_lora_rank is None:
            self.wq = nn.Linear(dim, n_heads * d_qk, bias=False)
        else:
            self.wq_a = nn.Linear(dim, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(mla.q_lora_rank, n_heads * d_qk, bias=False)
        self.wkv_a = nn.Linear(dim, mla.kv_lora_rank, bias=False)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.wk_rope = nn.Linear(dim, self.d_rope, bias=False)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, n_heads * (self.d_nope + self.d_v), bias=False)
        self.wo = nn.Linear(n_heads * self.d_v, dim, bias=False)
        self.attention_fn: AttentionFn = causal_attention

    def forward(self, x_BSD: torch.Tensor, positions: torch.Tensor,
                doc_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, S, D], positions [S] or [B, S] (integer token positions in the window),
        doc_positions [B, S] or None (positions in their documents; `Attention.forward`)
        -> [B, S, D]."""
        B, S, _ = x_BSD.shape
        if self.wq is not None:
            q = self.wq(x_BSD)
        else:
            q = self.wq_b(self.q_a_norm(self.wq_a(x_BSD)))
        q_BSHd = q.view(B, S, -1, self.d_nope + self.d_rope)
        H = q_BSHd.shape[2]
        kv_BSHd = self.wkv_b(self.kv_a_norm(self.wkv_a(x_BSD))).view(B, S, H, self.d_nope + self.d_v)
        k_nope_BSHd, v_BSHd = kv_BSHd.split([self.d_nope, self.d_v], dim=-1)
        rope_positions = positions if doc_positions is None else doc_positions
        cos, sin = rope_cos_sin(rope_positions, self.d_rope, self.rope_theta, self.rope_scaling)
        q_rope_BSHd = apply_rope(q_BSHd[..., self.d_nope:], cos, sin)
        k_rope_BS1d = apply_rope(self.wk_rope(x_BSD).view(B, S, 1, self.d_rope), cos, sin)
        q_BSHd = torch.cat([q_BSHd[..., :self.d_nope], q_rope_BSHd], dim=-1)
        k_BSHd = torch.cat([k_nope_BSHd, k_rope_BS1d.expand(B, S, H, self.d_rope)], dim=-1)
        self._note_max_logits(q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2), positions,
                              self.softmax_scale, doc_positions)
        o_BHSd = self.attention_fn(q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2),
                                   v_BSHd.transpose(1, 2), positions, scale=self.softmax_scale,
                                   doc_positions=doc_positions)
        return self.wo(o_BHSd.transpose(1, 2).reshape(B, S, -1))

    def qk_clip_scales(self, eta_H: torch.Tensor) -> dict[str, torch.Tensor]:
        """MuonClip's row factors for MLA (Kimi K2 report, "MuonClip"): only the head-specific
        parts - each head's q_nope rows and k_nope rows (wkv_b) by sqrt(eta_h), its q_rope rows
        by eta_h; the shared rotary key (wk_rope), the values and the latents stay. Head h's
        logit q_nope.k_nope + q_rope.k_rope then scales by eta_h. Global row counts."""
        H = eta_H.numel()
        root = eta_H.sqrt()
        q = torch.cat([root[:, None].expand(H, self.d_nope),
                       eta_H[:, None].expand(H, self.d_rope)], dim=1).reshape(-1)
        kv = torch.cat([root[:, None].expand(H, self.d_nope),
                        torch.ones_like(eta_H)[:, None].expand(H, self.d_v)], dim=1).reshape(-1)
        return {("wq.weight" if self.wq is not None else "wq_b.weight"): q, "wkv_b.weight": kv}
