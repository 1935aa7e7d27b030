"""The pieces the real families need, each against an independent reference: q/k RMSNorm (per
head, over the projection), multi-head latent attention (an explicit per-head computation),
YaRN frequencies and scales (transformers' functions), the routed scaling factor and
DeepSeek-V2's group score, and Qwen2-MoE's shared-expert gate (transformers' MoE block)."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config.schema import MLAConfig, MoEConfig, RopeScalingConfig, RoutingConfig
from moetrain.model.attention import Attention
from moetrain.model.mla import MultiHeadLatentAttention, mla_softmax_scale
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.router import Router
from moetrain.model.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq

B, S, D = 2, 7, 32


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, cos, sin):  # x [B, S, H, d] rotate-half, tables [S, d]
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def _attend(q, k, v, scale):  # [B, S, H, d] each, causal, heads independent
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _randomise_norms(module):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("kind", ["head", "full"])
def test_qk_norm_normalises_per_head_or_over_the_projection(kind):
    attn = Attention(D, 4, 2, 8, qk_norm=kind)
    _randomise_norms(attn)
    x, pos = torch.randn(B, S, D), torch.arange(S)
    q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
    if kind == "full":  # one statistic over all heads' features (OLMoE)
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    q, k, v = q.view(B, S, 4, 8), k.view(B, S, 2, 8), v.view(B, S, 2, 8)
    if kind == "head":  # one statistic per head, the weight shared by the heads (Qwen3)
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    cos, sin = rope_cos_sin(pos, 8)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    want = attn.wo(_attend(q, k, v, 8 ** -0.5).reshape(B, S, -1))
    torch.testing.assert_close(attn(x, pos), want, rtol=1e-5, atol=1e-6)
    assert attn.q_norm.weight.shape == ((8,) if kind == "head" else (32,))


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_latent_attention_is_per_head_attention_over_rebuilt_keys(q_lora_rank):
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=6)
    scaling = RopeScalingConfig(kind="yarn", factor=4.0, original_max_position_embeddings=4,
                                mscale=1.0, mscale_all_dim=0.8)
    attn = MultiHeadLatentAttention(D, 4, mla, rope_scaling=scaling)
    _randomise_norms(attn)
    x, pos = torch.randn(B, S, D), torch.arange(S)
    q = attn.wq(x) if q_lora_rank is None else attn.wq_b(_rms(attn.wq_a(x), attn.q_a_norm.weight))
    q = q.view(B, S, 4, 12)
    kv = attn.wkv_b(_rms(attn.wkv_a(x), attn.kv_a_norm.weight)).view(B, S, 4, 14)
    cos, sin = rope_cos_sin(pos, 4, scaling=scaling)
    k_rope = _rotate(attn.wk_rope(x).view(B, S, 1, 4), cos, sin).expand(B, S, 4, 4)
    q = torch.cat([q[..., :8], _rotate(q[..., 8:], cos, sin)], -1)
    k = torch.cat([kv[..., :8], k_rope], -1)
    scale = 12 ** -0.5 * (0.1 * 0.8 * math.log(4.0) + 1) ** 2  # DeepSeek's YaRN mscale
    assert mla_softmax_scale(mla, scaling) == pytest.approx(scale)
    want = attn.wo(_attend(q, k, kv[..., 8:], scale).reshape(B, S, -1))
    torch.testing.assert_close(attn(x, pos), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("theta, factor, beta_fast, beta_slow, mscale, mscale_all_dim", [
    (10000.0, 40.0, 32.0, 1.0, 0.707, 0.9),
    # Kimi K2's config.json: equal rotation counts (a step, not a ramp), over theta 50000
    (50000.0, 32.0, 1.0, 1.0, 1.0, 1.0),
])
def test_yarn_frequencies_and_factors_are_transformers(theta, factor, beta_fast, beta_slow,
                                                       mscale, mscale_all_dim):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "beta_fast": beta_fast,
            "beta_slow": beta_slow, "original_max_position_embeddings": 4096, "mscale": mscale,
            "mscale_all_dim": mscale_all_dim}
    hf = DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=rope, max_position_embeddings=163840)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = RopeScalingConfig(kind="yarn", factor=factor, original_max_position_embeddings=4096,
                             beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale,
                             mscale_all_dim=mscale_all_dim)
    torch.testing.assert_close(rope_inv_freq(64, theta, ours).float(), inv_freq, rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(attention_factor, rel=1e-12)
    assert not torch.allclose(rope_inv_freq(64, theta).float(), inv_freq)  # it does scale


def test_yarn_without_mscale_scales_attention_as_transformers():
    """A YaRN config that names neither mscale nor mscale_all_dim (a Qwen3 / Llama YaRN config):
    the attention factor is 0.1 ln(factor) + 1 on cos and sin, as transformers computes it."""
    from transformers import Qwen3MoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 32}
    hf = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                        rope_parameters=rope, max_position_embeddings=128)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)  # the formula, independently
    ours = RopeScalingConfig(kind="yarn", factor=4.0, original_max_position_embeddings=32)
    positions = torch.arange(100)
    cos, sin = rope_cos_sin(positions, 16, 10000.0, ours)
    angles = positions[:, None].double() * inv_freq.double()
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos, (angles.cos() * factor).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin, (angles.sin() * factor).float(), rtol=1e-5, atol=1e-6)


def test_routed_scaling_factor_and_the_max_group_score():
    torch.manual_seed(0)
    x = torch.randn(64, D)
    routing = RoutingConfig(group_mode="limited", num_groups=4, topk_groups=2, group_score="max")
    router = Router(D, 16, 3, "softmax", norm_topk_prob=False, routing=routing,
                    routed_scaling_factor=2.5)
    torch.nn.init.normal_(router.weight, std=0.3)
    out = router(x)
    torch.testing.assert_close(out.topk_weight_TK, out.scores_TE.gather(1, out.topk_idx_TK) * 2.5)
    group_best = out.scores_TE.view(64, 4, 4).max(-1).values  # DeepSeek-V2: a group's best expert
    kept = group_best.topk(2, -1).indices
    assert all(set((out.topk_idx_TK[t] // 4).tolist()) <= set(kept[t].tolist()) for t in range(64))
    # the two-best-sum score (DeepSeek-V3) keeps other groups for some tokens
    router.routing = RoutingConfig(group_mode="limited", num_groups=4, topk_groups=2)
    assert not torch.equal(router(x).topk_idx_TK.sort(-1).values, out.topk_idx_TK.sort(-1).values)


def test_shared_expert_gate_is_qwen2_moe():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    hf_cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=16, num_experts=4,
                            num_experts_per_tok=2, shared_expert_intermediate_size=24,
                            norm_topk_prob=False)
    hf = Qwen2MoeSparseMoeBlock(hf_cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layer = MoELayer(D, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1,
                                  shared_expert_hidden=24, norm_topk_prob=False,
                                  shared_expert_gate=True)).eval()
    with torch.no_grad():
        layer.router.weight.copy_(hf.gate.weight)
        gate_W, up_W = hf.experts.gate_up_proj.chunk(2, dim=1)  # [E, F, D] each
        layer.experts.w1.copy_(gate_W.transpose(1, 2))
        layer.experts.w3.copy_(up_W.transpose(1, 2))
        layer.experts.w2.copy_(hf.experts.down_proj.transpose(1, 2))
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(layer.shared_experts, ours).weight.copy_(getattr(hf.shared_expert, theirs).weight)
        layer.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), hf(x), rtol=1e-5, atol=1e-6)
