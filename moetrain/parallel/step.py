"""Step runners: one optimizer step's micro-batches through this rank's part of the model, and
the step's one reduction.

    StepRunner          a loop over the micro-batches (no pipeline parallelism)
    PipelineStepRunner  a torch.distributed.pipelining schedule over this rank's stages

`parallelize` (moetrain/parallel/parallelize.py) returns the runner for the layout. The runner owns
everything of a step that depends on the layout: which part of a batch this rank computes
(`shard_batch`: the model inputs and targets of moetrain/model/inputs.py, cut into this rank's
context-parallel chunks), the loss (moetrain/parallel/loss.py) and its context (vocab-parallel
cross-entropy under TP), when gradients are reduced (`grad_sync`: FSDP2 units reduce after the
last micro-batch; under PP the embedding shared by the first and last stage is summed over the
two after the schedule), which ranks contribute a loss, and the step's one all-reduce of named
values (`reduce_step`). The trainer gives it the batches as the sampler made them and reads back
named sums; the MoE layers keep their own step statistics (moetrain/model/moe/control.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.model.inputs import InputSpec, ModelInputs, model_inputs
from moetrain.parallel.context_parallel import shard_positions, shard_sequence
from moetrain.parallel.grad_norm import grad_sq_norm_share
from moetrain.parallel.loss import StepLoss, cross_entropy_sum
from moetrain.parallel.pipeline.schedule import Pipeline, pipeline_eval_step, pipeline_train_step
from moetrain.parallel.rank import RankLayout
from moetrain.parallel.reduction import Packed, StepSums

Autocast = Callable[[], ContextManager]


class StepRunner:
    """Forward and backward of each micro-batch in turn (gradient accumulation), and the step's
    reductions. `fsdp_units`: the FSDP2 modules of the model (sharded or replicated data
    parallelism), whose gradient reduction waits for a step's last micro-batch; `inputs`: how
    token windows become model inputs and targets (moetrain/model/inputs.py)."""

    computes_loss = True  # this rank's stages end in the output head

    def __init__(self, layout: RankLayout, fsdp_units: Sequence[FSDPModule] = (),
                 inputs: InputSpec = InputSpec()) -> None:
        self.layout = layout
        self.fsdp_units = list(fsdp_units)
        self.inputs = inputs
        self.loss = StepLoss(inputs.mtp_depth)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    # ------------------------------------------------------------------ one micro-batch
    def shard_batch(self, batch: torch.Tensor) -> tuple[ModelInputs, Optional[torch.Tensor]]:
        """(model inputs and targets, positions) of this rank's part of token ids [B, S + 1]:
        the sequences shifted by one (and by 1 + k for the MTP depths), the document positions
        and, under CP, this rank's chunks of all of them with their true positions (None =
        0..S-1). Everything is computed on the whole sequence first, so a chunk's shifted
        targets are the tokens that follow it in the sequence, wherever they are held."""
        full = model_inputs(batch, self.inputs)
        cp, r = self.layout.dims.cp, self.layout.cp_rank
        if cp == 1:
            return full, None
        positions = shard_positions(full.tokens.shape[1], r, cp, device=batch.device)
        return full.map(lambda t: shard_sequence(t, r, cp)), positions

    def loss_context(self) -> ContextManager:
        """Around forward, the loss and backward (vocab-parallel loss under TP)."""
        return loss_parallel() if self.layout.dims.tp > 1 else nullcontext()

    @contextmanager
    def grad_sync(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce gradients only when `last`."""
        for unit in self.fsdp_units:  # FSDP accumulates unreduced gradients until `last`
            unit.set_requires_gradient_sync(last, recurse=False)
        yield

    def _forward(self, model: nn.Module, inp: ModelInputs, positions: Optional[torch.Tensor]):
        return model(inp.tokens, positions, inp.doc_positions, inp.mtp_tokens)

    # ------------------------------------------------------------------ one step
    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast,
                         mtp_loss_scale: float = 0.0) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's micro-batches of one optimizer step.

        batches: token ids [micro_batch, S + 1] each, in order. Each micro-batch's loss
        (moetrain/parallel/loss.py: the summed LM loss plus `mtp_loss_scale` / D times the
        summed MTP losses) is backpropagated divided by `tokens_per_step` (the global batch's
        tokens), so gradients summed over micro-batches and ranks are those of the global
        mean; every gradient reduction has run when it returns. Returns this rank's fp64 token
        sums (`StepLoss.sums`: zeros where it computes no loss) for `reduce_step`.
        """
        device = batches[0].device
        self.loss.start(tokens_per_step, mtp_loss_scale)
        for i, batch in enumerate(batches):
            inp, positions = self.shard_batch(batch)
            with self.grad_sync(i == len(batches) - 1), self.loss_context(), autocast():
                self.loss(self._forward(model, inp, positions), inp.targets).backward()
        return self.loss.sums(device)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> dict[str, torch.Tensor]:
        """The token sums (`StepLoss.sums`: LM and MTP loss sums and scored targets, fp64) of
        this rank's tokens of the given micro-batches (model in eval mode), for
        `sum_over_tokens`."""
        self.loss.start(1)
        for batch in batches:
            inp, positions = self.shard_batch(batch)
            with self.loss_context(), autocast():
                self.loss(self._forward(model, inp, positions), inp.targets)
        return self.loss.sums(batches[0].device)

    # ------------------------------------------------------------------ reductions
    def holds_loss(self) -> bool:
        """Whether this rank's loss sums count: TP ranks share their micro-batch's loss (TP rank
        0 contributes it) and pipeline stages but the last have none."""
        return self.layout.tp_rank == 0 and self.computes_loss

    def norm_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """The parameters whose gradients make up the global norm on this rank (each shared
        weight once)."""
        return model.parameters()

    def reduce_step(self, model: nn.Module, *, token_sums: dict[str, torch.Tensor],
                    sums: dict[str, torch.Tensor],
                    per_rank: dict[str, float | torch.Tensor]) -> StepSums:
        """Everything a step decides and logs, summed over every rank by ONE all-reduce and read
        by the host ONCE, by name:

        token_sums: sums over this rank's tokens of the LM loss (or of anything computed per
        token from the logits), counted once per micro-batch (`holds_loss`);
        sums: values every rank contributes (MoE statistics rows - every rank routes different
        tokens or holds different layers -, stop flags);
        per_rank: one value per rank (a float, e.g. its peak memory, a device scalar, e.g. the
        sync-free exchange's largest need, or a device tensor, e.g. the attention heads' largest
        logits [L, H], zero where the rank has no head), each rank filling its own slot of a
        [world_size, *shape] tensor, so the sum carries them all (`StepSums.maximum(name)` is
        the largest value, `rank_maximum(name)` the element-wise maximum over the ranks, on the
        device);
        and "grad_sq", this rank's share of the squared global gradient norm
        (`grad_sq_norm_share`), so `StepSums.grad_norm` is the whole model's.
        """
        layout = self.layout
        device = layout.device
        named: dict[str, torch.Tensor] = {}
        for name, value in token_sums.items():
            named[name] = value if self.holds_loss() else torch.zeros_like(value)
        stage_ranks = layout.dims.world_size // layout.dims.pp
        named["grad_sq"] = grad_sq_norm_share(self.norm_parameters(model), stage_ranks, device)
        named.update(sums)
        for name, value in per_rank.items():
            shape = value.shape if isinstance(value, torch.Tensor) else ()
            slots = torch.zeros(layout.dims.world_size, *shape, dtype=torch.float64,
                                device=device)
            slots[layout.rank] = value  # a float, or a device tensor: nothing is read
            named[name] = slots
        packed = Packed(named, device)
        summed = layout.all_reduce(packed.flat)
        # The step's one host read.
        return StepSums(device=packed.unpack(summed), packed=packed, host_values=summed.tolist())

    def sum_over_tokens(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum named per-token statistics of the loss (loss sums, target counts) over the ranks
        that compute them for different tokens: DP x CP (`holds_loss`); one collective."""
        if self.layout.meshes is None:
            return values
        held = {k: v if self.holds_loss() else torch.zeros_like(v) for k, v in values.items()}
        packed = Packed(held, self.layout.device)
        return packed.unpack(self.layout.all_reduce(packed.flat))


class PipelineStepRunner(StepRunner):
    """The step's micro-batches stacked and run by the pipeline schedule over this rank's stages
    (`pipeline`: moetrain/parallel/pipeline/schedule.py). The FSDP units' reduction is deferred
    by torch's stages to the schedule's last backward.

    `shared`: this rank's copy of a weight the first and the last stage both hold (the
    embedding, with MTP or a tied head; moetrain/parallel/pipeline/stages.py) and the group of
    those two stages' ranks: its gradient is summed over the group after the schedule, and the
    last stage leaves its copy out of the gradient norm."""

    def __init__(self, layout: RankLayout, pipeline: Pipeline,
                 fsdp_units: Sequence[FSDPModule] = (), inputs: InputSpec = InputSpec(),
                 shared: Optional[tuple[nn.Parameter, dist.ProcessGroup]] = None) -> None:
        super().__init__(layout, fsdp_units, inputs)
        self.pipe = pipeline
        self.loss = pipeline.loss
        self.computes_loss = pipeline.is_last
        self.shared = shared

    def _stacked(self, batches: Sequence[torch.Tensor]):
        inp, positions = self.shard_batch(torch.cat(list(batches)))
        return (inp.tokens, inp.targets), dict(positions=positions,
                                               doc_positions=inp.doc_positions,
                                               mtp_tokens=inp.mtp_tokens)

    def forward_backward(self, model: nn.Module, batches: Sequence[torch.Tensor],
                         tokens_per_step: int, autocast: Autocast,
                         mtp_loss_scale: float = 0.0) -> dict[str, torch.Tensor]:
        self.loss.start(tokens_per_step, mtp_loss_scale)
        (inputs, targets), kwargs = self._stacked(batches)
        with self.loss_context(), autocast():
            pipeline_train_step(self.pipe, inputs, targets, **kwargs)
        self._sum_shared_grad()
        return self.loss.sums(batches[0].device)

    @torch.no_grad()
    def _sum_shared_grad(self) -> None:
        """The shared weight's gradient: the sum of the two stages' (every rank of the pair
        then holds the gradient of the one weight)."""
        if self.shared is None:
            return
        param, group = self.shared
        grad = param.grad
        if grad is None:  # this copy took no part in the step: contribute zeros
            grad = param.grad = torch.zeros_like(param)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        dist.all_reduce(local, group=group)

    def norm_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        skip = self.shared[0] if self.shared is not None and self.pipe.is_last else None
        return (p for p in model.parameters() if p is not skip)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Autocast) -> dict[str, torch.Tensor]:
        self.loss.start(1)
        (inputs, targets), kwargs = self._stacked(batches)
        with self.loss_context(), autocast():
            pipeline_eval_step(self.pipe, inputs, targets, **kwargs)
        return self.loss.sums(batches[0].device)


__all__ = ["PipelineStepRunner", "StepRunner", "cross_entropy_sum"]
