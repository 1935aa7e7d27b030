"""Global gradient-norm clipping over gradients sharded in different ways.

After TP and FSDP a model's gradients are DTensors on several meshes (dense weights on the 2-D
(dp_cp, tp) mesh, MoE weights on the dp_cp_tp or edp mesh, ...) and, without FSDP, plain tensors
that are already whole and replicated. `torch.nn.utils.clip_grad_norm_` cannot stack DTensors
of different meshes, so the norm is taken per (mesh, placements) group - DTensor turns each
group's norm into its full value (`full_tensor`: sums of squares over the shards, replicas
counted once) - and the groups' squares are added. Every rank gets the same value.

On CPU the norms accumulate in float64: torch's fp32 CPU norm kernel loses ~4e-4 (relative) on
a 1M-element tensor (the tiny model's output layer), which would dominate any comparison of
layouts; on GPU fp32 reductions are tree-shaped and accurate.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    *,
    stage_group: Optional[dist.ProcessGroup] = None,
) -> float:
    """L2 norm of all gradients (before clipping); scale them to `max_norm` when it is > 0.

    `stage_group`: ranks holding different parameters that no mesh of the gradients spans (the
    pipeline stages); their squared norms are summed over it.
    """
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:  # the model's order: the same groups in the same order on every rank
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    device = params[0].grad.device if params else torch.device("cpu")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    total_sq = torch.zeros((), dtype=dtype, device=device)
    for grads in groups.values():
        norms = torch.stack([torch.linalg.vector_norm(g, 2.0, dtype=dtype) for g in grads])
        norm = torch.linalg.vector_norm(norms, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # one collective per group
        total_sq += norm.square()
    if stage_group is not None and dist.get_world_size(stage_group) > 1:
        dist.all_reduce(total_sq, group=stage_group)
    total = total_sq.sqrt().float()
    if max_norm > 0:
        # As torch.nn.utils.clip_grads_with_norm_, with a Python float: DTensor gradients of
        # any mesh can be scaled by it in place.
        coef = float((max_norm / (total + 1e-6)).clamp(max=1.0))
        for p in params:
            p.grad.mul_(coef)
    return float(total)


__all__ = ["clip_grad_norm_"]
