"""Step runners: how one optimizer step's micro-batches go through the model on this rank.

    MicroBatchSteps   a loop over the micro-batches (no pipeline parallelism)
    PipelineSteps     a torch.distributed.pipelining schedule over this rank's stages

Both take the batches as the trainer gives them and return the rank's fp64 LM loss sum (zero on
ranks that compute no loss); the MoE layers keep their own step statistics. They use the
context's `shard_batch`, `loss_context`, `cross_entropy_sum` and gradient reduction, so the
numbers are the same whichever runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import torch
from torch import nn

from moetrain.parallel.pipeline.schedule import (
    build_pipeline, pipeline_eval_step, pipeline_train_step,
)
from moetrain.parallel.pipeline.stages import StageModule

if TYPE_CHECKING:  # the context builds the runners; runners only call its methods
    from moetrain.parallel.context import ParallelContext

Autocast = Callable[[], ContextManager]


class MicroBatchSteps:
    """Forward and backward of each micro-batch in turn (gradient accumulation)."""

    computes_loss = True

    def __init__(self, ctx: "ParallelContext") -> None:
        self.ctx = ctx

    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast) -> torch.Tensor:
        ctx = self.ctx
        lm_sum = torch.zeros((), dtype=torch.float64, device=batches[0].device)
        for i, batch in enumerate(batches):
            inputs, targets, positions = ctx.shard_batch(batch)
            with ctx.grad_sync(i == len(batches) - 1), ctx.loss_context(), autocast():
                logits = model(inputs, positions)
                loss_sum = ctx.cross_entropy_sum(logits, targets)
                (loss_sum / tokens_per_step).backward()
            lm_sum += loss_sum.detach().to(torch.float64)
        return lm_sum

    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> torch.Tensor:
        ctx = self.ctx
        sums = torch.zeros(2, dtype=torch.float64, device=batches[0].device)
        for batch in batches:
            inputs, targets, positions = ctx.shard_batch(batch)
            with ctx.loss_context(), autocast():
                sums[0] += ctx.cross_entropy_sum(model(inputs, positions), targets).double()
            sums[1] += targets.numel()
        return sums


class PipelineSteps:
    """The step's micro-batches stacked and run by the pipeline schedule over this rank's
    stages; `model` is the rank's stages as one module with the full model's parameter names
    (what the optimizer, checkpoints and clipping take)."""

    def __init__(self, ctx: "ParallelContext", stage_modules: list[StageModule], *,
                 schedule: str, n_microbatches: int, micro_batch_size: int, seq_len: int,
                 model_cfg) -> None:
        self.ctx = ctx
        self.pipe = build_pipeline(
            stage_modules, schedule=schedule, group=ctx.meshes.group("pp"), device=ctx.device,
            n_microbatches=n_microbatches, micro_batch_size=micro_batch_size, seq_len=seq_len,
            d_model=model_cfg.d_model, vocab_size=model_cfg.vocab_size,
            tokens_per_step=0,  # set per step
            cross_entropy_sum=ctx.cross_entropy_sum, sequence_shards=ctx.dims.tp)
        self.model = self.pipe.model
        self.computes_loss = self.pipe.is_last

    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast) -> torch.Tensor:
        ctx, pipe = self.ctx, self.pipe
        pipe.loss.tokens_per_step = tokens_per_step
        inputs, targets, positions = ctx.shard_batch(torch.cat(list(batches)))
        # torch's stages hold FSDP's gradient reduction until the schedule's last backward
        with ctx.loss_context(), autocast():
            local = pipeline_train_step(pipe, inputs, targets, positions=positions)
        ctx.reduce_replicated_grads()
        return local if local is not None else torch.zeros((), dtype=torch.float64,
                                                            device=batches[0].device)

    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> torch.Tensor:
        ctx = self.ctx
        inputs, targets, positions = ctx.shard_batch(torch.cat(list(batches)))
        with ctx.loss_context(), autocast():
            local = pipeline_eval_step(self.pipe, inputs, targets, positions=positions)
        sums = torch.zeros(2, dtype=torch.float64, device=batches[0].device)
        if local is not None:
            sums[0] = local.to(sums.device)
        sums[1] = targets.numel()
        return sums


StepRunner = MicroBatchSteps | PipelineSteps

__all__ = ["MicroBatchSteps", "PipelineSteps", "StepRunner"]
