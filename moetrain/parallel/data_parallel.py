"""Data parallelism with FSDP2: parameters sharded (`parallel.fsdp.enabled`, ZeRO-2/3) or
replicated (FSDP2's replicate dimension: a 2-D (replicate, shard) mesh whose shard dimension is
1, i.e. HSDP without sharding - torch reduces the gradients, no hand-written reducer).

Every reduction is a plain SUM (the trainer scales the losses), each over the ranks that hold
other tokens of the same parameters:

    dense parameters               dp_cp     (TP ranks hold other shards, not other tokens)
    routed experts                 edp       (the MoE view's data-parallel ranks)
    the MoE layer's other params   dp_cp_tp  (router, shared experts: each TP rank routes its
                                             own tokens under sequence parallelism)

so each MoE layer's experts are one FSDP unit, the rest of the layer another, the block a third
(the units' meshes decide; where two are the same ranks they merge). Why, and the FSDP2 details
(units, ZeRO-2/3, sums on gloo without PREMUL_SUM): docs/data_parallel.md.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from moetrain.model.block import blocks
from moetrain.parallel.mesh import Meshes


def _same_ranks(a: DeviceMesh, b: DeviceMesh) -> bool:
    return a.mesh.tolist() == b.mesh.tolist()


def apply_data_parallel(model: nn.Module, meshes: Meshes, *, shard: bool = True,
                        reshard_after_forward: bool = True) -> list[FSDPModule]:
    """Apply FSDP2 to `model` (a Transformer or pipeline stage, after TP/EP/CP): sharded over
    each unit's ranks when `shard`, else replicated there. Returns every FSDP module, the root
    last."""
    units: list[FSDPModule] = []

    def wrap(module: nn.Module, kind: str, reshard: bool) -> None:
        mesh = meshes.mesh(kind) if shard else meshes.replicate_mesh(kind)
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
        if mesh.size() > 1:  # a plain sum: divide factor 1, no PREMUL_SUM (gloo has none)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        units.append(module)

    reshard = reshard_after_forward and shard
    same = lambda a, b: _same_ranks(meshes.mesh(a), meshes.mesh(b))  # noqa: E731
    for block in blocks(model):  # the main model's, then the MTP modules'
        if block.moe is not None:
            if not same("edp", "dp_cp_tp"):
                wrap(block.moe.experts, "edp", reshard)
            if not same("dp_cp_tp", "dp_cp"):
                wrap(block.moe, "dp_cp_tp", reshard)
        wrap(block, "dp_cp", reshard)
    for module in (getattr(model, "mtp", None) or {}).values():  # its norms and projection
        wrap(module, "dp_cp", reshard)
    wrap(model, "dp_cp", False)
    return units


def unit_meshes(units: Sequence[FSDPModule]) -> list[tuple[FSDPModule, DeviceMesh]]:
    """Each FSDP unit with the mesh its gradients are reduced over (for tests and the docs)."""
    return [(u, u._get_fsdp_state()._fsdp_param_group.mesh_info.mesh) for u in units]


__all__ = ["apply_data_parallel", "unit_meshes"]
