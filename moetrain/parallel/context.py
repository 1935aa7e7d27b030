"""What the training loop needs to know about the layout, behind one small object.

The trainer never touches process groups itself: it asks the `ParallelContext` for this rank's
data-parallel slice, to parallelize the plain model, for the LM loss of (possibly vocab-sharded)
logits, to sum token and routing statistics over the ranks that hold different tokens, to clip
the global gradient norm, and whether to sync gradients on this micro-batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import MoetrainConfig
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.grad_norm import clip_grad_norm_


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
        """Around one micro-batch's forward and backward: reduce gradients only when `last`."""
        return nullcontext()

    def loss_context(self):
        """Around forward, `cross_entropy_sum` and backward (vocab-parallel loss under TP)."""
        return nullcontext()

    def cross_entropy_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed LM cross-entropy of logits [B, S, V] against targets [B, S], a plain fp32
        scalar (under TP the same on every TP rank); call inside `loss_context()`."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def all_reduce_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a statistic of the LM loss over the ranks that compute it for different tokens
        (DP x CP; TP ranks share the loss of their micro-batch); the identity on one process."""
        return tensor

    def all_reduce_routing(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum MoE routing statistics over every rank routing different tokens (DP x CP, and TP
        under sequence parallelism); the identity on one process."""
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (stop decisions must agree)."""
        return flag

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global L2 norm of all gradients before clipping; clip to `max_norm` when it is > 0."""
        return clip_grad_norm_(model.parameters(), max_norm)


def build_parallel_context(dims: ParallelDims, device_type: str) -> ParallelContext:
    if dims.world_size == 1:
        return ParallelContext(dims, device_type)
    from moetrain.parallel.distributed import DistributedContext

    return DistributedContext(dims, device_type)
