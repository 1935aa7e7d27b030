"""One rank's place in the layout: its coordinates, its meshes and the sums it takes part in.

    rank = RankLayout.create(dims, device)     # after the default process group exists
    rank.dp_rank, rank.tp_rank, ...            # coordinates in the dense view
    rank.all_reduce(t, "dp_cp_tp")             # a sum over this rank's group of a kind

On one process (world size 1) there are no meshes and every collective is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.mesh import Meshes, build_meshes


@dataclass(frozen=True)
class RankLayout:
    """The layout `dims` as seen by global rank `rank`; `meshes` is None on one process."""

    dims: ParallelDims
    rank: int
    device: torch.device
    meshes: Optional[Meshes]

    @classmethod
    def create(cls, dims: ParallelDims, device: torch.device) -> "RankLayout":
        """This process's view (collective when world size > 1: every rank builds the meshes)."""
        if dims.world_size == 1:
            return cls(dims, 0, device, None)
        return cls(dims, dist.get_rank(), device, build_meshes(dims, device.type))

    @property
    def dp_rank(self) -> int:
        return self.dims.dense_coord(self.rank).dp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def cp_rank(self) -> int:
        return self.dims.dense_coord(self.rank).cp

    @property
    def tp_rank(self) -> int:
        return self.dims.dense_coord(self.rank).tp

    @property
    def pp_rank(self) -> int:
        return self.dims.dense_coord(self.rank).pp

    def all_reduce(self, tensor: torch.Tensor, kind: Optional[str] = None,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or `op`) `tensor` over this rank's group of `kind` (a GROUP_KINDS name; None =
        every rank), on the layout's device, into a new tensor on the input's device."""
        if self.meshes is None or (kind is not None and self.dims.size(kind) == 1):
            return tensor
        out = tensor.to(self.device, copy=True)  # NCCL needs device tensors; never in place
        dist.all_reduce(out, op=op, group=self.meshes.group(kind) if kind else None)
        return out.to(tensor.device)

    def sum_over(self, kind: str) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A function summing a tensor over this rank's group of `kind`; None when the group
        is this rank alone."""
        if self.meshes is None or self.dims.size(kind) == 1:
            return None
        return lambda t: self.all_reduce(t, kind)

    def max_over_ranks(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum over every rank of a few integers, in one collective and one
        host read (once, after initialisation; a step's values ride in the step's reduction)."""
        t = torch.tensor(list(values), dtype=torch.int64)
        return self.all_reduce(t, op=dist.ReduceOp.MAX).tolist()


__all__ = ["RankLayout"]
