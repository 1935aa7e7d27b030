"""torch.distributed.pipelining stages and schedules around this rank's stage modules.

    build_pipeline(stage_modules, ..., loss=StepLoss(D))  -> Pipeline: stages, schedule, loss
    pipeline_train_step(pipe, inputs, targets)  one optimizer step's micro-batches; returns the
                                                LM loss sum on the last stage, else None
    pipeline_eval_step(pipe, inputs, targets)   forward only

Schedules (`parallel.pp_schedule`; torch class):
    gpipe        ScheduleGPipe                   one stage per rank (vpp = 1)
    1f1b         Schedule1F1B                    one stage per rank (vpp = 1)
    interleaved  ScheduleInterleaved1F1B         vpp >= 1 stages per rank
    zero_bubble  ScheduleInterleavedZeroBubble   vpp >= 1 (ZB1P: backward split into input and
                                                 weight gradients)

The schedule calls the loss function (moetrain/parallel/loss.py, the micro-batch loop's) once
per micro-batch on the last stage; it returns the micro-batch's loss / tokens_per_step (the
global tokens of the step), with `scale_grads=False`, so gradients summed over micro-batches and
ranks are those of the global mean. The MoE aux losses need no pipeline support
(`AttachAuxLoss` feeds them their gradient from the backward of the layer's output, whichever
stage that is on), nor do the MoE statistics (each layer sums its own; moe/stats.py). The
multi-token-prediction modules sit on the last stage, after the output head; their inputs (the
tokens k ahead, `mtp_tokens`) reach every stage as keyword arguments like the positions, and
the last stage returns (logits, MTP logits...) to the loss. Stage boundaries are declared
statically ([mb, S] token ids in, [mb, S/tp, D] hidden states between stages), so torch runs no
shape-inference pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from moetrain.parallel.checks import MULTI_STAGE_SCHEDULES
from moetrain.parallel.loss import StepLoss
from moetrain.parallel.pipeline.stages import RankModel, StageModule

#: parallel.pp_schedule -> torch schedule class (which ones run several stages per rank:
#: moetrain.parallel.checks.MULTI_STAGE_SCHEDULES).
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved": ScheduleInterleaved1F1B, "zero_bubble": ScheduleInterleavedZeroBubble}

@dataclass
class Pipeline:
    """This rank's part of the pipeline: stages, schedule and loss."""

    schedule: object
    stages: list[PipelineStage]
    stage_modules: list[StageModule]
    model: RankModel
    loss: StepLoss
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
    loss: StepLoss,
    activation_dtype: Optional[torch.dtype] = None,
    sequence_shards: int = 1,
) -> Pipeline:
    """Wrap this rank's stage modules (already parallelized: FSDP2 roots are fine, torch's
    stages defer their gradient reduction to the end of the step) in PipelineStages and a
    schedule. The schedule and micro-batch count were checked with the layout
    (`moetrain.parallel.checks`).

    n_microbatches: this DP rank's micro-batches per optimizer step; seq_len: the tokens per
    sequence a stage sees (after CP splitting); loss: the step's loss function (its
    `mtp_depth` D: the last stage returns 1 + D logits); activation_dtype: dtype of the hidden
    states between stages (default: the stage parameters' dtype); sequence_shards: ranks
    splitting the hidden states between stages along the sequence (TP's sequence parallelism:
    each rank sends its [mb, seq_len / tp, D] shard).
    """
    num_stages = stage_modules[0].num_stages
    stages = []
    for sm in stage_modules:
        inputs, outputs = _boundary_examples(sm, micro_batch_size, seq_len, d_model, vocab_size,
                                             activation_dtype, sequence_shards, loss.mtp_depth)
        if not sm.is_last:  # a wrong declaration would garble the activations sent
            sm.module.register_forward_hook(_boundary_check(outputs))
        stages.append(PipelineStage(sm.module, sm.index, num_stages, device, group=group,
                                    input_args=inputs, output_args=outputs))
    cls = SCHEDULES[schedule]
    stage_arg = stages if schedule in MULTI_STAGE_SCHEDULES else stages[0]
    sched = cls(stage_arg, n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False)
    return Pipeline(sched, stages, stage_modules, RankModel(stage_modules), loss, n_microbatches)


def _boundary_examples(sm: StageModule, mb: int, seq_len: int, d_model: int, vocab_size: int,
                       dtype: Optional[torch.dtype], sequence_shards: int = 1, mtp_depth: int = 0):
    """Meta tensors of a stage's input and output (what torch would infer by a forward): the
    last stage's output is the logits, or with D MTP modules a tuple of 1 + D logits."""
    if dtype is None:
        dtype = next(sm.module.parameters()).dtype
    hidden = torch.empty(mb, seq_len // sequence_shards, d_model, dtype=dtype, device="meta",
                         requires_grad=True)
    inputs = torch.empty(mb, seq_len, dtype=torch.long, device="meta") if sm.is_first else hidden
    outputs = hidden
    if sm.is_last:
        logits = [torch.empty(mb, seq_len, vocab_size, dtype=dtype, device="meta",
                              requires_grad=True) for _ in range(1 + mtp_depth)]
        outputs = logits[0] if mtp_depth == 0 else tuple(logits)
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


def _step_args(pipe: Pipeline, inputs, targets, positions, doc_positions, mtp_tokens):
    args = (inputs,) if pipe.is_first else ()
    target = targets if pipe.is_last else None
    kwargs = {}
    if positions is not None:
        if positions.dim() == 1:  # one row for every micro-batch; each gets [1, S]
            positions = positions.unsqueeze(0).expand(pipe.n_microbatches, -1)
        kwargs["positions"] = positions
    # [micro-batches * mb, S(, D)]: split into micro-batches like the inputs
    if doc_positions is not None:
        kwargs["doc_positions"] = doc_positions
    if mtp_tokens is not None:
        kwargs["mtp_tokens"] = mtp_tokens
    return args, target, kwargs


def pipeline_train_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
    doc_positions: Optional[torch.Tensor] = None,
    mtp_tokens: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward and backward of all this DP rank's micro-batches of one optimizer step.

    inputs / targets: [n_microbatches * micro_batch, S] token ids (the micro-batches stacked in
    order; targets [.., S, 1 + D] with MTP), needed on the first / last stage (may be None
    elsewhere). positions: None (0..S-1), [S], or [n_microbatches * micro_batch, S];
    doc_positions [n_microbatches * micro_batch, S] and mtp_tokens [.., S, D] or None; all on
    every stage. Start `pipe.loss` before (its divisor and MTP weight). Gradients accumulate
    into the stage parameters' .grad (zero them before; start the MoE step before, as without
    PP). Returns the fp64 sum of the LM cross-entropy over this rank's tokens on the last stage
    (`pipe.loss.sums` has all the sums), None elsewhere.
    """
    args, target, kwargs = _step_args(pipe, inputs, targets, positions, doc_positions,
                                      mtp_tokens)
    pipe.schedule.step(*args, target=target, return_outputs=False, **kwargs)
    return pipe.loss.sums(_device(pipe))["lm_sum"] if pipe.is_last else None


@torch.no_grad()
def pipeline_eval_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
    doc_positions: Optional[torch.Tensor] = None,
    mtp_tokens: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward only (modules in eval mode; start `pipe.loss` before); the LM cross-entropy sum
    on the last stage (`pipe.loss.sums` has all the sums)."""
    args, target, kwargs = _step_args(pipe, inputs, targets, positions, doc_positions,
                                      mtp_tokens)
    pipe.schedule.eval(*args, target=target, **kwargs)
    return pipe.loss.sums(_device(pipe))["lm_sum"] if pipe.is_last else None


def _device(pipe: Pipeline) -> torch.device:
    return pipe.stages[0].device


__all__ = ["SCHEDULES", "Pipeline", "build_pipeline", "pipeline_eval_step",
           "pipeline_train_step"]
