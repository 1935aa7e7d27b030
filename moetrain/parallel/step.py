"""Step runners: one optimizer step's micro-batches through this rank's part of the model, and
the step's one reduction.

    StepRunner          a loop over the micro-batches (no pipeline parallelism)
    PipelineStepRunner  a torch.distributed.pipelining schedule over this rank's stages

`parallelize` (moetrain/parallel/parallelize.py) returns the runner for the layout. The runner owns
everything of a step that depends on the layout: which part of a batch this rank computes
(`shard_batch`), the loss context (vocab-parallel cross-entropy under TP), when gradients are
reduced (`grad_sync`: FSDP2 units reduce after the last micro-batch), which ranks contribute a
loss, and the step's one all-reduce of named values (`reduce_step`). The trainer gives it the
batches as the sampler made them and reads back named sums; the MoE layers keep their own step
statistics (moetrain/model/moe/control.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.parallel.context_parallel import shard_positions, shard_sequence
from moetrain.parallel.grad_norm import grad_sq_norm_share
from moetrain.parallel.pipeline.schedule import Pipeline, pipeline_eval_step, pipeline_train_step
from moetrain.parallel.rank import RankLayout
from moetrain.parallel.reduction import Packed, StepSums

Autocast = Callable[[], ContextManager]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed LM cross-entropy of logits [B, S, V] against targets [B, S], an fp32 scalar; call
    inside `StepRunner.loss_context()`. Under TP the logits are vocab-sharded and the sum is a
    DTensor replicated over TP: its local value is the whole micro-batch's (and backward through
    to_local gives each replica the same gradient)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return loss.to_local() if isinstance(loss, DTensor) else loss


class StepRunner:
    """Forward and backward of each micro-batch in turn (gradient accumulation), and the step's
    reductions. `fsdp_units`: the FSDP2 modules of the model (sharded or replicated data
    parallelism), whose gradient reduction waits for a step's last micro-batch."""

    computes_loss = True  # this rank's stages end in the output head

    def __init__(self, layout: RankLayout, fsdp_units: Sequence[FSDPModule] = ()) -> None:
        self.layout = layout
        self.fsdp_units = list(fsdp_units)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    # ------------------------------------------------------------------ one micro-batch
    def shard_batch(
        self, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(inputs, targets, positions) of this rank's part of token ids [B, S + 1]: the
        sequences shifted by one and, under CP, this rank's chunks with their true positions
        (None = 0..S-1)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        cp, r = self.layout.dims.cp, self.layout.cp_rank
        if cp == 1:
            return inputs, targets, None
        positions = shard_positions(inputs.shape[1], r, cp, device=inputs.device)
        return shard_sequence(inputs, r, cp), shard_sequence(targets, r, cp), positions

    def loss_context(self) -> ContextManager:
        """Around forward, `cross_entropy_sum` and backward (vocab-parallel loss under TP)."""
        return loss_parallel() if self.layout.dims.tp > 1 else nullcontext()

    @contextmanager
    def grad_sync(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce gradients only when `last`."""
        for unit in self.fsdp_units:  # FSDP accumulates unreduced gradients until `last`
            unit.set_requires_gradient_sync(last, recurse=False)
        yield

    # ------------------------------------------------------------------ one step
    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of one optimizer step.

        batches: token ids [micro_batch, S + 1] each, in order. Each micro-batch's summed LM
        loss is backpropagated divided by `tokens_per_step` (the global batch's tokens), so
        gradients summed over micro-batches and ranks are those of the global mean; every
        gradient reduction has run when it returns. Returns this rank's fp64 LM loss sum (zero
        where it computes no loss: the pipeline's other stages) for `reduce_step`.
        """
        lm_sum = torch.zeros((), dtype=torch.float64, device=batches[0].device)
        for i, batch in enumerate(batches):
            inputs, targets, positions = self.shard_batch(batch)
            with self.grad_sync(i == len(batches) - 1), self.loss_context(), autocast():
                logits = model(inputs, positions)
                loss_sum = cross_entropy_sum(logits, targets)
                (loss_sum / tokens_per_step).backward()
            lm_sum += loss_sum.detach().to(torch.float64)
        return lm_sum

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> torch.Tensor:
        """[LM loss sum, targets] (fp64) of this rank's tokens of the given micro-batches (model
        in eval mode), for `sum_over_tokens`."""
        sums = torch.zeros(2, dtype=torch.float64, device=batches[0].device)
        for batch in batches:
            inputs, targets, positions = self.shard_batch(batch)
            with self.loss_context(), autocast():
                sums[0] += cross_entropy_sum(model(inputs, positions), targets).double()
            sums[1] += targets.numel()
        return sums

    # ------------------------------------------------------------------ reductions
    def holds_loss(self) -> bool:
        """Whether this rank's loss sums count: TP ranks share their micro-batch's loss (TP rank
        0 contributes it) and pipeline stages but the last have none."""
        return self.layout.tp_rank == 0 and self.computes_loss

    def reduce_step(self, model: nn.Module, *, token_sums: dict[str, torch.Tensor],
                    sums: dict[str, torch.Tensor],
                    per_rank: dict[str, float],
                    maxima: Optional[dict[str, torch.Tensor]] = None) -> StepSums:
        """Everything a step decides and logs, summed over every rank by ONE all-reduce and read
        by the host ONCE, by name:

        token_sums: sums over this rank's tokens of the LM loss (or of anything computed per
        token from the logits), counted once per micro-batch (`holds_loss`);
        sums: values every rank contributes (MoE statistics rows - every rank routes different
        tokens or holds different layers -, stop flags);
        per_rank: one float per rank (e.g. its peak memory), each rank filling its own slot of
        a world-size vector, so the sum carries them all;
        maxima: values whose maximum over the ranks is wanted (e.g. the attention heads'
        largest logits [L, H]), each entry given by the ranks that computed it and zero
        elsewhere (`_maxima_slots`); `StepSums.device[name]` is the maximum, `host(name)` the
        [dp x cp, *shape] slots (its maximum over dim 0 is the same);
        and "grad_sq", this rank's share of the squared global gradient norm
        (`grad_sq_norm_share`), so `StepSums.grad_norm` is the whole model's.
        """
        layout = self.layout
        device = layout.device
        named: dict[str, torch.Tensor] = {}
        for name, value in token_sums.items():
            named[name] = value if self.holds_loss() else torch.zeros_like(value)
        stage_ranks = layout.dims.world_size // layout.dims.pp
        named["grad_sq"] = grad_sq_norm_share(model.parameters(), stage_ranks, device)
        named.update(sums)
        for name, value in per_rank.items():
            slots = torch.zeros(layout.dims.world_size, dtype=torch.float64)
            slots[layout.rank] = float(value)
            named[name] = slots
        for name, value in (maxima or {}).items():
            named[name] = self._maxima_slots(value)
        packed = Packed(named, device)
        summed = layout.all_reduce(packed.flat)
        on_device = packed.unpack(summed)
        for name in maxima or {}:
            on_device[name] = on_device[name].amax(0)
        # The step's one host read.
        return StepSums(device=on_device, packed=packed, host_values=summed.tolist())

    def _maxima_slots(self, values: torch.Tensor) -> torch.Tensor:
        """`values` in this rank's slot of [dp x cp, *shape]. The dp x cp ranks compute the same
        entry from different tokens; the TP ranks and pipeline stages sharing a slot fill
        disjoint entries. Summed over every rank each slot holds one rank's values and the
        maximum over the slots is exact: a maximum inside the step's one sum (dp x cp x N
        values)."""
        dims = self.layout.dims
        out = values.new_zeros(dims.dp * dims.cp, *values.shape)
        out[self.layout.dp_rank * dims.cp + self.layout.cp_rank] = values
        return out

    def sum_over_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-token statistics of the LM loss (a loss sum, a target count) over the ranks
        that compute them for different tokens: DP x CP (`holds_loss`); one collective."""
        if self.layout.meshes is None:
            return values
        return self.layout.all_reduce(values if self.holds_loss() else torch.zeros_like(values))


class PipelineStepRunner(StepRunner):
    """The step's micro-batches stacked and run by the pipeline schedule over this rank's stages
    (`pipeline`: moetrain/parallel/pipeline/schedule.py). The FSDP units' reduction is deferred
    by torch's stages to the schedule's last backward."""

    def __init__(self, layout: RankLayout, pipeline: Pipeline,
                 fsdp_units: Sequence[FSDPModule] = ()) -> None:
        super().__init__(layout, fsdp_units)
        self.pipe = pipeline
        self.computes_loss = pipeline.is_last

    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast) -> torch.Tensor:
        pipe = self.pipe
        pipe.loss.tokens_per_step = tokens_per_step
        inputs, targets, positions = self.shard_batch(torch.cat(list(batches)))
        with self.loss_context(), autocast():
            local = pipeline_train_step(pipe, inputs, targets, positions=positions)
        return local if local is not None else torch.zeros((), dtype=torch.float64,
                                                            device=batches[0].device)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> torch.Tensor:
        inputs, targets, positions = self.shard_batch(torch.cat(list(batches)))
        with self.loss_context(), autocast():
            local = pipeline_eval_step(self.pipe, inputs, targets, positions=positions)
        sums = torch.zeros(2, dtype=torch.float64, device=batches[0].device)
        if local is not None:
            sums[0] = local.to(sums.device)
        sums[1] = targets.numel()
        return sums


__all__ = ["PipelineStepRunner", "StepRunner", "cross_entropy_sum"]
