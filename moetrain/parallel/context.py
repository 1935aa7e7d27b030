"""What the training loop needs to know about the layout, behind one small object.

The trainer never touches process groups itself: it asks the `ParallelContext` for this rank's
data-parallel slice, to parallelize the plain model, to run the forward and backward of a
step's micro-batches (`forward_backward`: a loop over them, or a pipeline schedule), to sum
token and routing statistics over the ranks that hold different tokens, and to clip the global
gradient norm. `forward_backward` is built from the smaller pieces below (`shard_batch`,
`grad_sync`, `loss_context`, `cross_entropy_sum`), which layouts override.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import MoetrainConfig
from moetrain.model.moe.layer import MoEStats, collect_moe_stats
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

    # ------------------------------------------------------------------ one step
    def forward_backward(
        self, model: nn.Module, batches: Sequence[torch.Tensor], tokens_per_step: int,
        autocast: Callable[[], ContextManager],
    ) -> tuple[torch.Tensor, list[list[Optional[MoEStats]]]]:
        """Forward and backward of this rank's micro-batches of one optimizer step.

        batches: token ids [micro_batch, S + 1] each, in order. Each micro-batch's summed LM
        loss is backpropagated divided by `tokens_per_step` (the global batch's tokens), so
        gradients summed over micro-batches and ranks are those of the global mean. Returns the
        fp64 LM loss sum over this rank's tokens and, per micro-batch, every MoE layer's
        statistics (`RoutingAccumulator.add`).
        """
        lm_sum = torch.zeros((), dtype=torch.float64, device=batches[0].device)
        stats = []
        for i, batch in enumerate(batches):
            inputs, targets, positions = self.shard_batch(batch)
            with self.grad_sync(model, i == len(batches) - 1), self.loss_context(), autocast():
                logits = model(inputs, positions)
                loss_sum = self.cross_entropy_sum(logits, targets)
                (loss_sum / tokens_per_step).backward()
            lm_sum += loss_sum.detach().to(torch.float64)
            stats.append(collect_moe_stats(model))
        return lm_sum, stats

    @torch.no_grad()
    def eval_sums(
        self, model: nn.Module, batches: Sequence[torch.Tensor],
        autocast: Callable[[], ContextManager],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed LM loss, number of targets) of this rank's tokens of the given micro-batches
        (model in eval mode; fp64); `all_reduce_tokens` makes both global."""
        total = torch.zeros((), dtype=torch.float64, device=batches[0].device)
        count = torch.zeros((), dtype=torch.float64, device=batches[0].device)
        for batch in batches:
            inputs, targets, positions = self.shard_batch(batch)
            with self.loss_context(), autocast():
                total += self.cross_entropy_sum(model(inputs, positions), targets).double()
            count += targets.numel()
        return total, count

    def shard_batch(
        self, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(inputs, targets, positions) of this rank's part of token ids [B, S + 1]: the
        sequences shifted by one; positions None = 0..S-1 (context parallelism overrides)."""
        return batch[:, :-1], batch[:, 1:], None

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
    from moetrain.parallel.distributed import DistributedContext, PipelineContext

    return (PipelineContext if dims.pp > 1 else DistributedContext)(dims, device_type)
