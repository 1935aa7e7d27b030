"""MuonClip's model side: each head's largest causal logit (against explicit scores), its
tracking over a step's micro-batches, and the projection rows QK-clip scales - after scaling,
every head's logits are exactly eta_h times what they were (GQA, MHA, MLA with and without
low-rank queries)."""

from __future__ import annotations

import pytest
import torch

from moetrain.config.schema import MLAConfig
from moetrain.model import attention as attention_module
from moetrain.model.attention import (
    Attention, causal_max_logits, take_max_logits, track_max_logits,
)
from moetrain.model.mla import MultiHeadLatentAttention


def explicit_max(q, k, q_pos, k_pos, scale):
    """Every logit written out: [B, H, Sq, Sk] scores, the causal mask from positions."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(group, 1)) * scale
    visible = q_pos[:, None] >= k_pos[None, :]
    return scores.masked_fill(~visible, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("block_elements", [2 ** 26, 7])  # one block; one query row at a time
def test_largest_logit_per_head_against_the_explicit_scores(monkeypatch, block_elements):
    monkeypatch.setattr(attention_module, "_MAX_LOGIT_BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    pos = torch.tensor([0, 1, 2, 10, 11])
    got = causal_max_logits(q, k, pos, 0.3)
    assert torch.equal(got, explicit_max(q, k, pos, pos, 0.3))
    # keys from elsewhere (context parallelism): 9 keys, some after every local query
    k_all = torch.randn(2, 2, 9, 8, generator=gen)
    k_pos = torch.tensor([3, 4, 5, 6, 7, 8, 9, 12, 13])
    assert torch.equal(causal_max_logits(q, k_all, pos, 0.3, k_positions=k_pos),
                       explicit_max(q, k_all, pos, k_pos, 0.3))
    # a future key with a huge logit is not seen
    k_all[:, :, -1] = 100 * q[:, ::3, -1]
    assert torch.equal(causal_max_logits(q, k_all, pos, 0.3, k_positions=k_pos),
                       explicit_max(q, k_all, pos, k_pos, 0.3))


@pytest.mark.parametrize("block_elements", [2 ** 26, 7])
def test_packed_documents_count_only_the_logits_of_each_document(monkeypatch, block_elements):
    """data.document_mask: a query's largest logit is over its own document's keys (the logits
    the softmax uses), written out by hand per document; a huge logit across a boundary is not
    seen."""
    monkeypatch.setattr(attention_module, "_MAX_LOGIT_BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    pos = torch.arange(6)
    # sequence 0: documents [0, 1, 2] [3, 4, 5]; sequence 1: [0] [1, 2, 3, 4, 5]
    docs = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4]])
    k[0, :, 2] = 50 * q[0, ::2, 3]  # the key before sequence 0's boundary, huge for query 3
    want = torch.full((4,), float("-inf"))
    for b in range(2):
        for i in range(6):
            start = i - int(docs[b, i])
            scores = torch.einsum("hd,hkd->hk", q[b, :, i],
                                  k[b, :, start:i + 1].repeat_interleave(2, 0)) * 0.3
            want = torch.maximum(want, scores.amax(-1))
    got = causal_max_logits(q, k, pos, 0.3, doc_positions=docs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (causal_max_logits(q, k, pos, 0.3) > got).any()  # across the boundary: larger



def test_attention_tracks_the_step_maximum_only_while_training():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleDict({"0": torch.nn.Module(), "3": torch.nn.Module()})
    for block in model.layers.values():
        block.attention = Attention(16, 4, 2, 4)
    x, pos = torch.randn(2, 6, 16), torch.arange(6)
    assert take_max_logits(model) == []  # not tracking
    model.layers["0"].attention(x, pos)
    assert take_max_logits(model) == []
    track_max_logits(model)
    attn = model.layers["3"].attention
    first = attn(x, pos) is not None and attn.max_logits.clone()
    attn(2 * x, pos)  # a second micro-batch with larger logits
    second = attn.max_logits.clone()
    assert (second >= first).all() and (second > first).any()
    attn.eval()
    attn(10 * x, pos)
    assert torch.equal(attn.max_logits, second)  # evaluation is not tracked
    taken = dict(take_max_logits(model))
    assert list(taken) == [3] and torch.equal(taken[3], second)
    assert take_max_logits(model) == []  # reset


def test_tracking_under_torch_compile_equals_eager():
    """Regional compilation (train.compile) compiles the blocks: the attribute the forward
    updates must come out the same (dynamo's eager backend: the graph capture itself)."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 4)
    attn.track_max_logits = True
    x, pos = torch.randn(2, 6, 16), torch.arange(6)
    attn(x, pos)
    attn(3 * x, pos)
    want = attn.max_logits.clone()
    attn.max_logits = None
    attn.compile(backend="eager")
    for _ in range(2):  # the None -> tensor state of every step
        attn.max_logits = None
        attn(x, pos)
        attn(3 * x, pos)
        assert torch.equal(attn.max_logits, want)


def _logits_per_head(module, x, pos):
    """The logits each head computes, from the q and k the module hands its attention."""
    seen = {}

    def record(q, k, v, positions, scale=None, doc_positions=None):
        seen["logits"] = torch.einsum(
            "bhqd,bhkd->bhqk", q, k.repeat_interleave(q.shape[1] // k.shape[1], 1))
        return torch.zeros(*q.shape[:3], v.shape[-1])

    module.attention_fn = record
    module(x, pos)
    return seen["logits"]


def _apply(module, eta):
    with torch.no_grad():
        for name, factor in module.qk_clip_scales(eta).items():
            module.get_parameter(name).mul_(factor.unsqueeze(-1))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_clip_scales_each_heads_logits_by_its_eta(kv_heads):
    torch.manual_seed(1)
    attn = Attention(32, 4, kv_heads, 8)
    x, pos = torch.randn(2, 5, 32), torch.arange(5)
    before = _logits_per_head(attn, x, pos)
    eta = torch.tensor([0.25, 1.0, 0.6, 0.9])
    v_before = attn.wv.weight.detach().clone()
    _apply(attn, eta)
    after = _logits_per_head(attn, x, pos)
    torch.testing.assert_close(after, before * eta[None, :, None, None], rtol=1e-5, atol=1e-6)
    assert torch.equal(attn.wv.weight, v_before)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_clip_scales_only_the_head_specific_parts(q_lora_rank):
    torch.manual_seed(2)
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=6)
    attn = MultiHeadLatentAttention(32, 4, mla)
    x, pos = torch.randn(2, 5, 32), torch.arange(5)
    before = _logits_per_head(attn, x, pos)
    shared = {n: p.detach().clone() for n, p in attn.named_parameters()
              if n.startswith(("wk_rope", "wkv_a", "wq_a", "wo"))}
    v_rows = attn.wkv_b.weight.detach().view(4, 14, 16)[:, 8:].clone()
    eta = torch.tensor([0.5, 1.0, 0.3, 0.8])
    _apply(attn, eta)
    after = _logits_per_head(attn, x, pos)
    torch.testing.assert_close(after, before * eta[None, :, None, None], rtol=1e-5, atol=1e-6)
    # the shared rotary key, the latents, the values and the output stay
    assert all(torch.equal(p, shared[n]) for n, p in attn.named_parameters() if n in shared)
    assert torch.equal(attn.wkv_b.weight.detach().view(4, 14, 16)[:, 8:], v_rows)
