"""DeviceMesh views of the five-dimensional layout: one dense mesh, one MoE mesh, same ranks.

    dense = ("pp", "dp", "cp", "tp")      shape dims.dense_shape   (tp fastest-varying)
    moe   = ("pp", "edp", "ep", "etp")    shape dims.moe_shape     (etp fastest-varying)
    dp_cp = dense["dp", "cp"] flattened   (the dense gradient-reduction group)
    cp_tp = dense["cp", "tp"] flattened   (the ranks sharing one micro-batch: its LBL counts)
    dp_cp_tp = dense["dp", "cp", "tp"] flattened   (every rank of a pipeline stage: with
               sequence parallelism the ranks holding different tokens of the MoE layers)

Both views are unflattened from one 1-D world mesh (`DeviceMesh._unflatten`, torch >= 2.9: the
GPU machines' 2.11 and CI's 2.13 have it), so they share a root and DTensor / FSDP2 accept
either. Every group is checked against the pure-Python `ParallelDims.groups()` at build time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain.parallel.dims import GROUP_KINDS, ParallelDims

DENSE_DIMS = ("pp", "dp", "cp", "tp")
MOE_DIMS = ("pp", "edp", "ep", "etp")


@dataclass
class Meshes:
    """The meshes of one rank; `mesh(name)` / `group(name)` for every name in GROUP_KINDS."""

    dims: ParallelDims
    dense: DeviceMesh
    moe: DeviceMesh
    dp_cp: DeviceMesh
    cp_tp: DeviceMesh
    dp_cp_tp: DeviceMesh
    _views: dict[str, DeviceMesh] = field(init=False, repr=False)
    _replicate: dict[str, DeviceMesh] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        views = {name: self.dense[name] for name in DENSE_DIMS}
        views.update({name: self.moe[name] for name in ("edp", "ep", "etp")})
        views["dp_cp"] = self.dp_cp  # "pp" comes from the dense view; the MoE one has its ranks
        views["cp_tp"] = self.cp_tp
        views["dp_cp_tp"] = self.dp_cp_tp
        self._views = views

    def replicate_mesh(self, name: str) -> DeviceMesh:
        """The group of kind `name` as a 2-D (replicate, shard) mesh whose shard dimension is 1:
        FSDP2 over it replicates (replicated data parallelism). Made once per kind."""
        if name not in self._replicate:
            mesh = self.mesh(name)
            self._replicate[name] = mesh._unflatten(
                0, (mesh.size(), 1), (f"{name}_replicate", f"{name}_shard"))
        return self._replicate[name]

    @cached_property
    def experts(self) -> DeviceMesh:
        """The MoE mesh's 2-D ("ep", "etp") view: where the expert weights are DTensors."""
        return self.moe["ep", "etp"]

    def mesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of this rank's group of kind `name` (one of GROUP_KINDS)."""
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"unknown mesh {name!r}; known: {', '.join(GROUP_KINDS)}") from None

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group of this rank's group of kind `name`."""
        return self.mesh(name).get_group()

    def ranks(self, name: str) -> list[int]:
        """Global ranks of this rank's group of kind `name`, in group-rank order."""
        return self.mesh(name).mesh.tolist()

    def local_rank(self, name: str) -> int:
        """This rank's index inside its group of kind `name`."""
        return self.mesh(name).get_local_rank()


def forget_rank_caches() -> None:
    """Empty torch's DTensor caches (sharding propagation: the Python and the C++ fast path;
    redistribution plans). They are keyed by `DeviceMesh` equality, which ignores the rank, and
    hold the meshes they were filled with: a process that builds a second rank's model (the dry
    run's roles) or is forked from one that built DTensors (the CPU test launcher) would otherwise
    get the first rank's mesh, coordinates and group names back. Needs no process group."""
    from torch.distributed.tensor import _redistribute, debug

    # Private torch helpers (no public API empties these caches); each is looked up, as the set
    # differs between torch releases (the GPU image's 2.11, CI's 2.13).
    for module, name in ((debug, "_clear_python_sharding_prop_cache"),
                         (debug, "_clear_fast_path_sharding_prop_cache"),
                         (_redistribute, "clear_redistribute_planner_cache")):
        clear = getattr(module, name, None)
        if clear is not None:
            clear()
    transform_infos = getattr(_redistribute, "_gen_transform_infos", None)
    if transform_infos is not None and hasattr(transform_infos, "cache_clear"):
        transform_infos.cache_clear()


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    """Build the dense, MoE, dp_cp, cp_tp and dp_cp_tp meshes over the initialised default group.

    Collective: every rank must call it, in the same order relative to other group creation. On
    CUDA, set the current device before calling.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_meshes needs an initialised default process group")
    world = dist.get_world_size()
    if world != dims.world_size:
        raise ValueError(
            f"the layout is for world size {dims.world_size}, the process group has {world}"
        )
    forget_rank_caches()  # what torch cached for meshes equal to these is another rank's
    root = init_device_mesh(device_type, (dims.world_size,), mesh_dim_names=("world",))
    dense = root._unflatten(0, dims.dense_shape, DENSE_DIMS)
    moe = root._unflatten(0, dims.moe_shape, MOE_DIMS)
    meshes = Meshes(dims=dims, dense=dense, moe=moe, dp_cp=dense["dp", "cp"]._flatten("dp_cp"),
                    cp_tp=dense["cp", "tp"]._flatten("cp_tp"),
                    dp_cp_tp=dense["dp", "cp", "tp"]._flatten("dp_cp_tp"))
    _check_against_layout(meshes, dist.get_rank())
    return meshes


def _check_against_layout(meshes: Meshes, rank: int) -> None:
    """Assert that every mesh dim holds the ranks `ParallelDims` computes (no communication)."""
    dims = meshes.dims
    for view, shape in ((meshes.dense, dims.dense_shape), (meshes.moe, dims.moe_shape)):
        expected = torch.arange(dims.world_size).view(shape)
        if tuple(view.mesh.shape) != shape or not torch.equal(view.mesh.cpu().long(), expected):
            raise AssertionError(f"mesh {view.mesh_dim_names} is {view.mesh.tolist()}")
    for name in GROUP_KINDS:
        want = dims.group_of(name, rank)
        got_mesh = meshes.ranks(name)
        got_group = dist.get_process_group_ranks(meshes.group(name))
        if got_mesh != want or got_group != want:
            raise AssertionError(
                f"rank {rank}: {name} mesh ranks {got_mesh}, process group ranks {got_group}, "
                f"layout says {want} ({dims})"
            )
