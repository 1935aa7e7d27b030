"""Data parallelism: FSDP2 (default) or replicated parameters with a bucketed all-reduce.

Which ranks sum which gradients (DESIGN §2): every rank's micro-batch losses are already scaled
by the trainer (LM loss / global token count, aux losses / global micro-batch count), so the
global gradient is the plain SUM of the ranks' gradients over the ranks holding different tokens:

    dense parameters (embeddings, attention, norms, dense MLPs, output)   over dp_cp
    routed experts                                                        over edp
    router and shared experts                                             over dp_cp_tp

Under sequence parallelism the TP ranks route different tokens, so the MoE weights (plain
tensors, not TP-sharded) are summed over TP too; the TP-sharded dense weights are DTensors whose
TP reductions DTensor already did in backward. With ep = etp = 1, edp and dp_cp_tp are the same
ranks and one FSDP unit holds the whole MoE layer; units whose group equals the block's dp_cp
group (tp = 1, ep = 1) are left to the block's unit.

FSDP2 (`parallel.fsdp.enabled=true`): `fully_shard` per block (its MoE weights first, as their
own units when their group differs), then the root (embeddings, final norm, output; not
resharded after forward: backward needs them first). `parallel.fsdp.reshard_after_forward`:
true frees the gathered block weights after forward (ZeRO-3-like), false keeps them until
backward (ZeRO-2-like: sharded gradients and optimizer state, one all-gather per micro-batch).
With TP the dense units are 2-D: the TP DTensors are sharded again over dp_cp, which shares the
world mesh's root with tp. Reductions are plain sums: FSDP2 averages by default, and a divide
factor of 1 alone makes it use ReduceOp.PREMUL_SUM, which gloo lacks; with
`set_force_sum_reduction_for_comms` it sums and then divides by the factor (1). Set only on
meshes of size > 1 (on one rank FSDP already sums without dividing).

Replicated (`parallel.fsdp.enabled=false`): every rank holds all of its (TP) parameters and
`ReplicatedGradReducer` sums the gradients once per optimizer step, after the last micro-batch.
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
    shared = [moe.shared_experts] if moe.shared_experts is not None else []
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
