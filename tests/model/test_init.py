"""The counter-based initialisation: the generator against an independent Python computation,
shards of any shape and offset filled with the whole tensor's values, the rules by module kind,
and a model built on the meta device initialising like an eager one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moetrain.model import Transformer
from moetrain.model.init import (
    LocalShard, counter_normal, element_key, init_parameters, normal_,
)
from moetrain.model.norm import RMSNorm
from tests.model.tiny import make_cfg

_M = (1 << 64) - 1


def _python_normal(key: int, index: int) -> float:
    """splitmix64 + Box-Muller in Python integers and floats (the published algorithm)."""
    x = (key + (index + 1) * 0x9E3779B97F4A7C15) & _M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M
    x ^= x >> 31
    u1, u2 = ((x >> 40) + 0.5) / 2**24, (x & 0xFFFFFF) / 2**24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def test_the_generator_is_splitmix64_box_muller_and_standard_normal():
    key = element_key(1234, "layers.3.moe.experts.w1")
    index = torch.tensor([0, 1, 2, 3, 2**31 + 5, 2**40 + 17, 2**62 - 1])
    want = torch.tensor([_python_normal(key, int(i)) for i in index])
    torch.testing.assert_close(counter_normal(key, index), want.float(), rtol=2e-6, atol=2e-6)
    sample = counter_normal(key, torch.arange(1 << 18))
    assert abs(float(sample.mean())) < 0.01 and abs(float(sample.std()) - 1) < 0.01
    # another name or seed is another stream
    assert not torch.equal(counter_normal(element_key(1234, "layers.3.moe.experts.w3"), index),
                           counter_normal(key, index))
    assert not torch.equal(counter_normal(element_key(1235, "layers.3.moe.experts.w1"), index),
                           counter_normal(key, index))


@pytest.mark.parametrize("shape, region, limit", [
    ((6, 5, 7), (slice(2, 4), slice(None), slice(3, 7)), 4),   # experts 2-3, hidden 3-6, tiny chunks
    ((6, 5, 7), (slice(5, 6), slice(1, 4), slice(0, 7)), 1000),
    ((9, 11), (slice(4, 9), slice(0, 11)), 7),                 # rows, chunks across rows
    ((9, 11), (slice(0, 9), slice(6, 11)), 3),                 # columns (rowwise TP)
    ((13,), (slice(6, 13),), 2),
])
def test_a_shard_gets_the_whole_tensors_values_at_its_offsets(shape, region, limit):
    key = element_key(7, "w")
    whole = torch.empty(shape)
    normal_(LocalShard(whole, shape, (0,) * len(shape)), 0.02, key)
    block = whole[region]
    offset = tuple(s.indices(n)[0] for s, n in zip(region, shape))
    shard = LocalShard(torch.full(block.shape, math.nan), shape, offset)
    normal_(shard, 0.02, key, limit=limit)
    assert torch.equal(shard.tensor, block)
    assert torch.equal(whole[shard.region()], block)


class _WithNewModules(nn.Module):
    """Modules the init has no rule for by name: a norm, a biased linear, a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.q_norm = RMSNorm(8)
        self.kv_norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.gate = nn.Linear(8, 1, bias=False)
        self.register_buffer("counts", torch.ones(3))


def test_rules_are_by_module_kind_not_by_name():
    cfg = make_cfg(init_std=0.05)
    m = _WithNewModules()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(math.nan)
    init_parameters(m, cfg, seed=3)
    assert torch.equal(m.q_norm.weight, torch.ones(8)) and torch.equal(m.kv_norm.weight, torch.ones(8))
    assert torch.equal(m.kv_norm.bias, torch.zeros(8)) and torch.equal(m.proj.bias, torch.zeros(8))
    assert torch.equal(m.counts, torch.zeros(3))
    assert torch.isfinite(m.gate.weight).all() and 0.02 < float(m.proj.weight.detach().std()) < 0.08


def test_a_meta_built_model_initialises_like_an_eager_one():
    """Buffers included: a module whose buffer starts non-zero needs its own rule here."""
    cfg = make_cfg(n_layers=3)
    eager = Transformer(cfg)
    eager.init_weights(seed=21)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    init_parameters(meta, cfg, seed=21)
    state = lambda m: [*m.named_parameters(), *m.named_buffers()]  # noqa: E731
    for (n, a), (_, b) in zip(state(eager), state(meta), strict=True):
        assert torch.equal(a, b), n
    # residual-writing projections get init_std / sqrt(2 n_layers)
    attention = eager.layers["0"].attention
    ratio = float(attention.wo.weight.detach().std() / attention.wq.weight.detach().std())
    assert abs(ratio - 1 / math.sqrt(6)) < 0.1
