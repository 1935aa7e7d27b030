import math

import torch

from moetrain.model.attention import Attention
from moetrain.model.rope import apply_rope, rope_cos_sin


def naive_attention(attn: Attention, x, positions):
    B, S, _ = x.shape
    d = attn.head_dim
    q = attn.wq(x).view(B, S, -1, d)
    k = attn.wk(x).view(B, S, -1, d)
    v = attn.wv(x).view(B, S, -1, d)
    cos, sin = rope_cos_sin(positions, d, attn.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return attn.wo(out.reshape(B, S, -1))


def test_gqa_matches_naive_with_positions():
    attn = Attention(dim=24, n_heads=6, n_kv_heads=2, head_dim=8)
    x = torch.randn(2, 7, 24)
    gapped = torch.tensor([0, 1, 2, 10, 11, 12, 13])  # like a context-parallel shard
    outputs = []
    for positions in (torch.arange(7), torch.arange(7) + 100, gapped):
        out = attn(x, positions)
        torch.testing.assert_close(out, naive_attention(attn, x, positions))
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])  # RoPE sees relative positions only
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-4)  # positions are really used


def test_causality():
    attn = Attention(dim=16, n_heads=2, n_kv_heads=1, head_dim=8)
    x = torch.randn(1, 5, 16)
    y = attn(x, torch.arange(5))
    x2 = x.clone()
    x2[:, 3:] += 1.0
    y2 = attn(x2, torch.arange(5))
    torch.testing.assert_close(y[:, :3], y2[:, :3])
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_head_sharded_module_sums_to_full():
    """A tensor-parallel shard (colwise q/k/v, rowwise o) derives its head counts from weights."""
    full = Attention(dim=16, n_heads=4, n_kv_heads=2, head_dim=4)
    x = torch.randn(2, 5, 16)
    pos = torch.arange(5)
    total = torch.zeros(2, 5, 16)
    for r in range(2):
        shard = Attention(dim=16, n_heads=2, n_kv_heads=1, head_dim=4)
        with torch.no_grad():
            shard.wq.weight.copy_(full.wq.weight[8 * r:8 * r + 8])
            shard.wk.weight.copy_(full.wk.weight[4 * r:4 * r + 4])
            shard.wv.weight.copy_(full.wv.weight[4 * r:4 * r + 4])
            shard.wo.weight.copy_(full.wo.weight[:, 8 * r:8 * r + 8])
        total += shard(x, pos)
    torch.testing.assert_close(total, full(x, pos))
