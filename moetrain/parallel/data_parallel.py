"""Data parallelism: FSDP2 (default) or replicated parameters with a bucketed all-reduce.

Every reduction is a plain SUM (the trainer scales the losses): dense parameters over dp_cp,
routed experts over edp, router and shared experts over dp_cp_tp (`moe_units`). Why, and the
FSDP2 details (units, ZeRO-2/3, sums on gloo without PREMUL_SUM): docs/data_parallel.md.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from moetrain.model.moe.layer import MoELayer
from moetrain.parallel.mesh import Meshes

# A set of modules whose parameters' gradients are summed over one mesh.
Unit = tuple[list[nn.Module], DeviceMesh]


def _same_ranks(a: DeviceMesh, b: DeviceMesh) -> bool:
    return a.mesh.tolist() == b.mesh.tolist()


def moe_units(moe: MoELayer, meshes: Meshes) -> list[Unit]:
    """The MoE layer's parameters grouped by the mesh their gradients are summed over."""
    experts, tokens = meshes.mesh("edp"), meshes.mesh("dp_cp_tp")
    if _same_ranks(experts, tokens):
        return [([moe], tokens)]
    shared = [m for m in (moe.shared_experts, moe.shared_expert_gate) if m is not None]
    return [([moe.experts], experts), ([moe.router, *shared], tokens)]


# ---------------------------------------------------------------------------------------- FSDP2


def apply_fsdp(model: nn.Module, meshes: Meshes, reshard_after_forward: bool = True) -> list[FSDPModule]:
    """Shard `model` (after TP) with FSDP2; returns every FSDP module, the root last."""
    dense = meshes.mesh("dp_cp")
    units: list[FSDPModule] = []

    def shard(modules: Sequence[nn.Module] | nn.Module, mesh: DeviceMesh, reshard: bool) -> None:
        fully_shard(modules, mesh=mesh, reshard_after_forward=reshard)
        first = modules[0] if isinstance(modules, Sequence) else modules
        if mesh.size() > 1:  # a plain sum: divide factor 1, and no PREMUL_SUM (not on gloo)
            first.set_gradient_divide_factor(1.0)
            first.set_force_sum_reduction_for_comms(True)
        units.append(first)

    for block in model.layers.values():
        if block.moe is not None:
            for modules, mesh in moe_units(block.moe, meshes):
                if not _same_ranks(mesh, dense):
                    shard(modules if len(modules) > 1 else modules[0], mesh, reshard_after_forward)
        shard(block, dense, reshard_after_forward)
    shard(model, dense, False)
    return units


# ---------------------------------------------------------------------------- replicated DP


class ReplicatedGradReducer:
    """Sums every parameter's gradient over its group with bucketed all-reduces.

    Hand-written rather than DistributedDataParallel because DDP reduces all parameters over one
    process group, and here dense, expert and router gradients are summed over different groups
    (dp_cp, edp, dp_cp_tp). Gradients are reduced after the last micro-batch's backward (no
    overlap with backward: simple and exact; FSDP is the default for speed). TP parameters are
    DTensors: their local shards are reduced, TP ranks each over their own dp_cp group.
    """

    def __init__(self, model: nn.Module, meshes: Meshes, bucket_bytes: int = 25 * 2**20):
        self.bucket_bytes = bucket_bytes
        by_mesh: dict[tuple, tuple[DeviceMesh, list[nn.Parameter]]] = {}
        moe_params: set[int] = set()
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            for modules, mesh in moe_units(layer, meshes):
                params = [p for m in modules for p in m.parameters()]
                moe_params.update(id(p) for p in params)
                by_mesh.setdefault(tuple(mesh.mesh.tolist()), (mesh, []))[1].extend(params)
        dense = meshes.mesh("dp_cp")
        dense_params = [p for p in model.parameters() if id(p) not in moe_params]
        by_mesh.setdefault(tuple(dense.mesh.tolist()), (dense, []))[1].extend(dense_params)
        # Same order on every rank: the groups' and the parameters' order in the model.
        self.groups = [
            (mesh.get_group(), [p for p in params if p.requires_grad])
            for mesh, params in by_mesh.values()
            if mesh.size() > 1
        ]

    @torch.no_grad()
    def reduce(self) -> None:
        for group, params in self.groups:
            for bucket in self._buckets(params):
                grads = [_local_grad(p) for p in bucket]
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=group)
                offset = 0
                for g in grads:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    def _buckets(self, params: list[nn.Parameter]) -> Iterable[list[nn.Parameter]]:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = defaultdict(list)
        for p in params:
            by_dtype[p.dtype].append(p)
        for same_dtype in by_dtype.values():
            bucket, size = [], 0
            for p in same_dtype:
                bucket.append(p)
                size += p.numel() * p.element_size()
                if size >= self.bucket_bytes:
                    yield bucket
                    bucket, size = [], 0
            if bucket:
                yield bucket


def _local_grad(p: nn.Parameter) -> torch.Tensor:
    """p's gradient as the tensor to reduce in place (zeros if it got none, so every rank's
    buckets line up); a DTensor gradient is first brought to p's placements."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    if isinstance(p.grad, DTensor):
        if p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        return p.grad.to_local()
    return p.grad


__all__ = ["ReplicatedGradReducer", "apply_fsdp", "moe_units"]
