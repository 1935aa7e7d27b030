"""torch.distributed.pipelining stages and schedules around this rank's stage modules.

    build_pipeline(stage_modules, ...)  -> Pipeline: stages, schedule, loss
    pipeline_train_step(pipe, inputs, targets)  one optimizer step's micro-batches; returns the
                                                LM loss sum on the last stage, else None
    pipeline_eval_step(pipe, inputs, targets)   forward only

Schedules (`parallel.pp_schedule`; torch class):
    gpipe        ScheduleGPipe                   one stage per rank (vpp = 1)
    1f1b         Schedule1F1B                    one stage per rank (vpp = 1)
    interleaved  ScheduleInterleaved1F1B         vpp >= 1 stages per rank
    zero_bubble  ScheduleInterleavedZeroBubble   vpp >= 1 (ZB1P: backward split into input and
                                                 weight gradients)

The schedule calls the loss function once per micro-batch on the last stage; it returns
sum-CE / tokens_per_step (the global tokens of the step), as the micro-batch loop does, with
`scale_grads=False`, so gradients summed over micro-batches and ranks are those of the global
mean. The MoE aux losses need no pipeline support (`AttachAuxLoss` feeds them their gradient from
the backward of the layer's output, whichever stage that is on), nor do the MoE statistics (each
layer sums its own; moe/stats.py). Stage boundaries are declared statically ([mb, S] token ids
in, [mb, S/tp, D] hidden states between stages), so torch runs no shape-inference pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from moetrain.parallel.checks import MULTI_STAGE_SCHEDULES
from moetrain.parallel.pipeline.stages import RankModel, StageModule

#: parallel.pp_schedule -> torch schedule class (which ones run several stages per rank:
#: moetrain.parallel.checks.MULTI_STAGE_SCHEDULES).
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}

CESum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> sum of CE


class PipelineLoss:
    """The schedule's loss_fn: sum-CE / tokens_per_step; keeps each micro-batch's CE sum."""

    def __init__(self, tokens_per_step: int, cross_entropy_sum: CESum):
        self.tokens_per_step = tokens_per_step
        self.cross_entropy_sum = cross_entropy_sum
        self.sums: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss_sum = self.cross_entropy_sum(logits, targets)
        self.sums.append(loss_sum.detach())
        return loss_sum / self.tokens_per_step

    def total(self) -> torch.Tensor:
        """fp64 sum over the micro-batches so far, added in micro-batch order."""
        total = torch.zeros((), dtype=torch.float64, device=self.sums[0].device)
        for s in self.sums:
            total += s.to(torch.float64)
        return total


@dataclass
class Pipeline:
    """This rank's part of the pipeline: stages, schedule and loss."""

    schedule: object
    stages: list[PipelineStage]
    stage_modules: list[StageModule]
    model: RankModel
    loss: PipelineLoss
    n_microbatches: int

    @property
    def is_first(self) -> bool:
        return any(s.is_first for s in self.stage_modules)

    @property
    def is_last(self) -> bool:
        return any(s.is_last for s in self.stage_modules)


def build_pipeline(
    stage_modules: list[StageModule],
    *,
    schedule: str,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    n_microbatches: int,
    micro_batch_size: int,
    seq_len: int,
    d_model: int,
    vocab_size: int,
    tokens_per_step: int,
    cross_entropy_sum: CESum,
    activation_dtype: Optional[torch.dtype] = None,
    sequence_shards: int = 1,
) -> Pipeline:
    """Wrap this rank's stage modules (already parallelized: FSDP2 roots are fine, torch's
    stages defer their gradient reduction to the end of the step) in PipelineStages and a
    schedule. The schedule and micro-batch count were checked with the layout
    (`moetrain.parallel.checks`).

    n_microbatches: this DP rank's micro-batches per optimizer step; tokens_per_step: tokens of
    the whole global batch (the LM loss's divisor); seq_len: the tokens per sequence a stage
    sees (after CP splitting); activation_dtype: dtype of the hidden states between stages
    (default: the stage parameters' dtype); cross_entropy_sum: sum-CE of (logits, targets);
    sequence_shards: ranks splitting the hidden states between stages along the sequence (TP's
    sequence parallelism: each rank sends its [mb, seq_len / tp, D] shard).
    """
    num_stages = stage_modules[0].num_stages
    stages = []
    for sm in stage_modules:
        inputs, outputs = _boundary_examples(sm, micro_batch_size, seq_len, d_model, vocab_size,
                                             activation_dtype, sequence_shards)
        if not sm.is_last:  # a wrong declaration would garble the activations sent
            sm.module.register_forward_hook(_boundary_check(outputs))
        stages.append(PipelineStage(sm.module, sm.index, num_stages, device, group=group,
                                    input_args=inputs, output_args=outputs))
    loss = PipelineLoss(tokens_per_step, cross_entropy_sum)
    cls = SCHEDULES[schedule]
    stage_arg = stages if schedule in MULTI_STAGE_SCHEDULES else stages[0]
    sched = cls(stage_arg, n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False)
    return Pipeline(sched, stages, stage_modules, RankModel(stage_modules), loss, n_microbatches)


def _boundary_examples(sm: StageModule, mb: int, seq_len: int, d_model: int, vocab_size: int,
                       dtype: Optional[torch.dtype], sequence_shards: int = 1):
    """Meta tensors of a stage's input and output (what torch would infer by a forward)."""
    if dtype is None:
        dtype = next(sm.module.parameters()).dtype
    hidden = torch.empty(mb, seq_len // sequence_shards, d_model, dtype=dtype, device="meta",
                         requires_grad=True)
    inputs = torch.empty(mb, seq_len, dtype=torch.long, device="meta") if sm.is_first else hidden
    outputs = hidden
    if sm.is_last:
        outputs = torch.empty(mb, seq_len, vocab_size, dtype=dtype, device="meta",
                              requires_grad=True)
    return inputs, outputs


def _boundary_check(expected: torch.Tensor):
    """Forward hook: the stage's output is what its PipelineStage declared to send."""
    def check(module: nn.Module, args, output) -> None:
        if isinstance(output, DTensor):
            raise RuntimeError("a stage returned a DTensor: hand the next stage the local "
                               "shard (apply_tensor_parallel does for pipeline stages)")
        if output.shape != expected.shape or output.dtype != expected.dtype:
            raise RuntimeError(
                f"stage output {tuple(output.shape)} {output.dtype} is not the declared "
                f"{tuple(expected.shape)} {expected.dtype}: check micro_batch_size, seq_len and "
                "activation_dtype")
    return check


def _step_args(pipe: Pipeline, inputs, targets, positions):
    args = (inputs,) if pipe.is_first else ()
    target = targets if pipe.is_last else None
    kwargs = {}
    if positions is not None:
        if positions.dim() == 1:  # one row for every micro-batch; each gets [1, S]
            positions = positions.unsqueeze(0).expand(pipe.n_microbatches, -1)
        kwargs["positions"] = positions
    return args, target, kwargs


def pipeline_train_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward and backward of all this DP rank's micro-batches of one optimizer step.

    inputs / targets: [n_microbatches * micro_batch, S] token ids (the micro-batches stacked in
    order), needed on the first / last stage (may be None elsewhere). positions: None (0..S-1),
    [S], or [n_microbatches * micro_batch, S], on every stage. Gradients accumulate into the
    stage parameters' .grad (zero them before; start the MoE step before, as without PP).
    Returns the fp64 sum of the LM cross-entropy over this rank's tokens on the last stage,
    None elsewhere.
    """
    pipe.loss.sums.clear()
    args, target, kwargs = _step_args(pipe, inputs, targets, positions)
    pipe.schedule.step(*args, target=target, return_outputs=False, **kwargs)
    return pipe.loss.total() if pipe.is_last else None


@torch.no_grad()
def pipeline_eval_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward only (modules in eval mode); the LM cross-entropy sum on the last stage."""
    pipe.loss.sums.clear()
    args, target, kwargs = _step_args(pipe, inputs, targets, positions)
    pipe.schedule.eval(*args, target=target, **kwargs)
    return pipe.loss.total() if pipe.is_last else None


__all__ = ["SCHEDULES", "Pipeline", "PipelineLoss", "build_pipeline", "pipeline_eval_step",
           "pipeline_train_step"]
