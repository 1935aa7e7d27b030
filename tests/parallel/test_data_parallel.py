"""moetrain.parallel.data_parallel directly: FSDP2 sums (not means) each MoE layer's parameters
over the ranks holding other tokens of them - experts over edp, the rest of the layer over
dp_cp_tp, dense parameters over dp_cp -, sharded or replicated, on 2 and 4 gloo ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.fsdp  # noqa: F401 - imported in the parent for the forked ranks
from torch.distributed.tensor import DTensor

from moetrain.model import Transformer
from moetrain.parallel.data_parallel import apply_data_parallel, unit_meshes
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.mesh import build_meshes
from tests.harness import run_distributed
from tests.model.tiny import make_cfg


def _model():
    torch.manual_seed(0)
    return Transformer(make_cfg(moe=dict(first_dense_layers=1, num_shared_experts=1)))


def _grads_of(model, tokens):
    model.zero_grad(set_to_none=True)
    model(tokens).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _tokens(world_size, vocab):
    return torch.randint(0, vocab, (world_size, 6), generator=torch.Generator().manual_seed(3))


def _units_and_sums(rank, world_size, ep, shard, model, tokens, per_rank_grads):
    dims = ParallelDims(world_size, ep=ep)
    meshes = build_meshes(dims, "cpu")
    model = copy.deepcopy(model)
    if ep > 1:
        apply_expert_parallel(model, meshes.experts)
    units = apply_data_parallel(model, meshes, shard=shard)
    kinds = [(type(u).__name__.replace("FSDP", ""), sorted(mesh.mesh.flatten().tolist()))
             for u, mesh in unit_meshes(units)]
    model(tokens[rank:rank + 1]).square().mean().backward()
    want = {n: sum(g[n] for g in per_rank_grads) for n in per_rank_grads[0]}
    errors = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors[name] = float((grad - want[name]).abs().max() / want[name].abs().max())
    return kinds, errors


def _both(rank, world_size, ep, model, tokens, per_rank_grads):
    return {shard: _units_and_sums(rank, world_size, ep, shard, model, tokens, per_rank_grads)
            for shard in (False, True)}


@pytest.fixture(scope="module")
def launches():
    """One launch per world size, replicated and sharded in each: {world size: results by rank}."""
    model = _model()
    tokens = _tokens(4, model.cfg.vocab_size)
    per_rank = [_grads_of(copy.deepcopy(model), tokens[q:q + 1]) for q in range(4)]
    return {2: run_distributed(_both, 2, 1, model, tokens, per_rank[:2], timeout=90),
            4: run_distributed(_both, 4, 2, model, tokens, per_rank, timeout=120)}


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "fsdp"])
def test_each_unit_sums_its_gradients_over_its_mesh(shard, launches):
    # ep = 1 on 2 ranks: the MoE layer's ranks are the block's: a unit per block, then the root
    results = [by_shard[shard] for by_shard in launches[2]]
    kinds, _ = results[0]
    assert kinds == [("TransformerBlock", [0, 1])] * 2 + [("Transformer", [0, 1])]
    assert max(e for _, errs in results for e in errs.values()) < 1e-6
    # ep = 2 on 4 ranks: the experts over edp ({0, 2}, {1, 3}), router and shared experts with
    # the block over all four
    results = [by_shard[shard] for by_shard in launches[4]]
    kinds, _ = results[1]
    assert kinds == [("TransformerBlock", [0, 1, 2, 3]), ("GroupedExperts", [1, 3]),
                     ("TransformerBlock", [0, 1, 2, 3]), ("Transformer", [0, 1, 2, 3])]
    worst = max(e for _, errs in results for e in errs.values())
    assert worst < 1e-6, worst
