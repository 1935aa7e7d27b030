"""The global gradient norm over gradients sharded in different ways, and clipping.

After TP, EP and FSDP a model's gradients are DTensors on several meshes (dense weights on the
2-D (dp_cp, tp) mesh, experts on the (edp, ep, etp) one, ...) and plain tensors replicated over
the ranks of a pipeline stage. Every rank of a stage holds some shard of each of the stage's
parameters, so

    |g|^2 = sum over every rank of  sum_p |local g_p|^2 / replicas_p

where replicas_p = (ranks per stage) / (distinct shards of p) counts the ranks holding the same
values. Each rank computes its share (`grad_sq_norm_share`, no communication) and one sum over
every rank gives the norm: the trainer folds it into its one reduction per step. On CPU the
squares accumulate in float64 (torch's fp32 CPU norm loses ~4e-4 relative on a 1M-element
tensor, which would dominate any comparison of layouts); on GPU per-tensor fp32 norms are exact
enough and their squares are added in float64.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def _distinct_shards(grad: torch.Tensor) -> int:
    if not isinstance(grad, DTensor):
        return 1
    mesh = grad.device_mesh
    # Not p.is_shard(): FSDP2's _StridedShard (FSDP over a TP/EP-sharded dim) shards too but is
    # no Shard. Partial placements were reduced before.
    return math.prod(mesh.size(i) for i, p in enumerate(grad.placements)
                     if not p.is_replicate())


@torch.no_grad()
def grad_sq_norm_share(parameters: Iterable[nn.Parameter], ranks_per_stage: int,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """This rank's share of the squared global gradient norm (float64 scalar on the gradients'
    device, or `device` when there are none): summed over every rank, the squared norm of the
    full model's gradient. `ranks_per_stage`: world size / pipeline stages (1 on one process)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    share = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):  # pending sums: do them first
                g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p
                                                   for p in g.placements])
            replicas = ranks_per_stage // _distinct_shards(g)
            g = g.to_local()
        else:
            replicas = ranks_per_stage
        if g.device.type == "cpu":
            sq = g.double().square().sum()
        else:
            sq = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32).double().square()
        share += sq.to(device) / replicas
    return share


@torch.no_grad()
def scale_grads_(parameters: Iterable[nn.Parameter], coef: float) -> None:
    """Multiply every gradient by `coef` in place (DTensor gradients of any mesh too)."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(coef)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """As torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6), at most 1; 1 when
    max_norm <= 0 (no clipping)."""
    return min(1.0, max_norm / (total_norm + 1e-6)) if max_norm > 0 else 1.0


__all__ = ["clip_coefficient", "grad_sq_norm_share", "scale_grads_"]
