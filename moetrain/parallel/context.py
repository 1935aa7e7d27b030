"""What the training loop needs to know about the layout, behind one small object.

The trainer never touches process groups itself: it asks the `ParallelContext` for this rank's
data-parallel slice, to parallelize the plain model, to sum token statistics over the ranks that
hold different tokens, to clip the global gradient norm, and whether to sync gradients on this
micro-batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from moetrain.config.schema import MoetrainConfig
from moetrain.parallel.dims import ParallelDims


class ParallelContext:
    """One process: every collective is the identity."""

    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        self.dims = dims
        self.device_type = device_type
        self.dp_rank = 0
        self.dp_size = 1

    def parallelize(self, model: nn.Module, cfg: MoetrainConfig) -> nn.Module:
        return model

    def grad_sync(self, model: nn.Module, last: bool):
        return nullcontext()

    def all_reduce_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different tokens (DP x CP); the identity on one process."""
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (stop decisions must agree)."""
        return flag

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global L2 norm of all gradients before clipping; clip to `max_norm` when it is > 0."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(
                [p for p in model.parameters() if p.grad is not None], max_norm, norm, foreach=False
            )
        return float(norm)


def build_parallel_context(dims: ParallelDims, device_type: str) -> ParallelContext:
    if dims.world_size == 1:
        return ParallelContext(dims, device_type)
    from moetrain.parallel.distributed import DistributedContext

    return DistributedContext(dims, device_type)
