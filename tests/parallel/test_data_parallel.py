"""moetrain.parallel.data_parallel directly: which mesh sums which MoE parameters, the
replicated reducer's sums, and FSDP2's sums (not means) over 2 and 4 gloo ranks."""

from __future__ import annotations

import copy

import torch
import torch.distributed.fsdp  # noqa: F401 - imported in the parent for the forked ranks
from torch.distributed.tensor import DTensor

from moetrain.model import Transformer
from moetrain.parallel.data_parallel import ReplicatedGradReducer, apply_fsdp, moe_units
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import apply_expert_parallel, distribute_expert_weights
from moetrain.parallel.mesh import build_meshes
from tests.distributed.launcher import run_distributed
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


def _units_and_replicated(rank, world_size, ep, model, tokens, per_rank_grads):
    dims = ParallelDims(world_size, ep=ep)
    meshes = build_meshes(dims, "cpu")
    model = copy.deepcopy(model)
    moe = model.layers["1"].moe
    units = moe_units(moe, meshes)
    if ep > 1:
        apply_expert_parallel(model, meshes.group("ep"))
        distribute_expert_weights(model, meshes.experts)
    kinds = [(sorted(type(m).__name__ for m in mods), mesh.mesh.tolist()) for mods, mesh in units]
    reducer = ReplicatedGradReducer(model, meshes)
    model.zero_grad(set_to_none=True)
    model(tokens[rank:rank + 1]).square().mean().backward()
    if rank == 0:  # a parameter without a gradient here: zeros join the sum
        model.layers["1"].moe.shared_experts.w2.weight.grad = None
    reducer.reduce()
    want = {n: sum(g[n] for g in per_rank_grads) for n in per_rank_grads[0]}
    errors = {}
    for name, p in model.named_parameters():
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        expected = want[name]
        if ".experts." in name and ep > 1:  # this rank's expert shard (of every rank's tokens)
            L = expected.shape[0] // ep
            r = meshes.local_rank("ep")
            expected = expected[r * L:(r + 1) * L]
        if name.endswith("shared_experts.w2.weight"):  # rank 0 added zeros
            expected = sum(g[name] for q, g in enumerate(per_rank_grads) if q != 0)
        errors[name] = float((grad - expected).abs().max() / expected.abs().max())
    return kinds, errors


def test_replicated_reducer_sums_each_group_over_its_mesh():
    model = _model()
    tokens = _tokens(4, model.cfg.vocab_size)
    per_rank = [_grads_of(copy.deepcopy(model), tokens[q:q + 1]) for q in range(4)]
    # ep = 1: one unit (the whole MoE layer) over all ranks
    results = run_distributed(_units_and_replicated, 2, 1, model, tokens, per_rank[:2],
                              timeout=60)
    kinds, errors = results[0]
    assert kinds == [(["MoELayer"], [0, 1])]
    assert max(e for _, errs in results for e in errs.values()) < 1e-6
    # ep = 2 on 4 ranks: experts over edp ({0, 2}, {1, 3}); router + shared over all four
    results = run_distributed(_units_and_replicated, 4, 2, model, tokens, per_rank, timeout=90)
    kinds, _ = results[1]
    assert kinds == [(["GroupedExperts"], [1, 3]), (["FeedForward", "Router"], [0, 1, 2, 3])]
    worst = max(e for _, errs in results for e in errs.values())
    assert worst < 1e-6, worst


def _fsdp_sums(rank, world_size, model, tokens):
    meshes = build_meshes(ParallelDims(world_size), "cpu")
    model = copy.deepcopy(model)
    units = apply_fsdp(model, meshes)
    model(tokens[rank:rank + 1]).square().mean().backward()
    return len(units), units[-1] is model, {n: p.grad.full_tensor() for n, p in
                                             model.named_parameters()}


def test_fsdp_sums_gradients_over_data_parallel_ranks():
    model = _model()
    tokens = _tokens(2, model.cfg.vocab_size)
    per_rank = [_grads_of(copy.deepcopy(model), tokens[q:q + 1]) for q in range(2)]
    results = run_distributed(_fsdp_sums, 2, model, tokens, timeout=60)
    n_units, root_last, grads = results[0]
    assert n_units == 1 + len(model.layers) and root_last  # a unit per block, then the root
    for name, g in grads.items():
        torch.testing.assert_close(g, per_rank[0][name] + per_rank[1][name], rtol=1e-5,
                                   atol=1e-7, msg=name)
