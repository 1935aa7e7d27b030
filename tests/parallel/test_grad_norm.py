"""moetrain.parallel.grad_norm: the global norm over plain, DTensor-sharded and
pipeline-stage gradients, and the clipping it applies."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import torch.distributed as dist

from moetrain.parallel.grad_norm import clip_coefficient, grad_sq_norm_share, scale_grads_
from tests.harness import run_distributed


def clip_grad_norm_(params, max_norm, ranks_per_stage=1):
    """The trainer's clipping: each rank's share of the squared norm, summed over every rank
    (the step's reduction), then one coefficient for every gradient. Returns the norm."""
    share = grad_sq_norm_share(params, ranks_per_stage)
    if dist.is_initialized():
        dist.all_reduce(share)
    norm = float(share.sqrt())
    scale_grads_(params, clip_coefficient(norm, max_norm))
    return norm


def _params(*grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def test_plain_gradients_norm_and_clip():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 200, generator=gen), torch.randn(7, generator=gen)]
    want = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    params = _params(*grads)
    assert clip_grad_norm_(params, 0.0) == pytest.approx(want, rel=1e-7)  # 0: no clipping
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    norm = clip_grad_norm_(params, want / 4)
    assert norm == pytest.approx(want, rel=1e-7)
    clipped = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    assert clipped == pytest.approx(want / 4, rel=1e-5)
    # a norm under max_norm is left alone (coefficient clamped to 1)
    params = _params(*grads)
    clip_grad_norm_(params, 10 * want)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


def test_cpu_norm_is_accurate_on_a_large_tensor():
    # torch's fp32 CPU norm loses 3.4e-4 relative here; the float64 path only the final
    # rounding to fp32
    g = torch.full((1 << 20,), 0.1) + torch.linspace(0, 1e-3, 1 << 20)
    want = float(g.double().square().sum().sqrt())
    assert abs(clip_grad_norm_(_params(g), 0.0) - want) / want < 1e-7


def test_no_gradients_is_a_zero_norm():
    p = torch.nn.Parameter(torch.ones(3))
    assert clip_grad_norm_([p], 1.0) == 0.0


def _sharded_and_stages(rank, world_size, stage_grads):
    """4 ranks = 2 pipeline stages x a 2-rank mesh. Each stage holds its own parameters: a
    Shard(0) DTensor grad, a Replicate DTensor grad and a plain (replicated) one; the pp group
    (ranks with the same mesh position) sums the stages' squares."""
    stage = rank // 2
    world = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    mesh = world["dp"]
    full = stage_grads[stage]
    sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(full[0], mesh, [Shard(0)])
    replicated = torch.nn.Parameter(distribute_tensor(torch.zeros(5), mesh, [Replicate()]))
    replicated.grad = distribute_tensor(full[1], mesh, [Replicate()])
    plain = torch.nn.Parameter(torch.zeros(3))
    plain.grad = full[2].clone()
    return clip_grad_norm_([sharded, replicated, plain], 0.0, ranks_per_stage=2)


def test_dtensor_shards_counted_once_and_stages_summed():
    gen = torch.Generator().manual_seed(1)
    stage_grads = [[torch.randn(8, 4, generator=gen), torch.randn(5, generator=gen),
                    torch.randn(3, generator=gen)] for _ in range(2)]
    norms = run_distributed(_sharded_and_stages, 4, stage_grads, timeout=60)
    # every tensor once: shards summed, replicas not, the two stages' parameters both
    want = math.sqrt(sum(float(g.double().square().sum()) for grads in stage_grads for g in grads))
    assert len(set(norms)) == 1 and norms[0] == pytest.approx(want, rel=1e-6)
