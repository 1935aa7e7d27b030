"""What the training loop needs to know about the layout, behind one object (any world size).

The trainer never touches a process group: it asks the `ParallelContext` for this rank's
data-parallel slice, for its model (`build_model`: built on the meta device and parallelized
there, which also picks the step runner, a micro-batch loop or a pipeline schedule,
moetrain/parallel/steps.py; then only the rank's shards are allocated and initialised), to run
a step's forward and backward, to sum the step's statistics over the ranks, and to clip the
global gradient norm. A step's sums take one collective and one host read (`step_sums`). On
one process every collective is the identity. docs/parallelism.md has the
5-D picture and who reduces what.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.config.schema import MoetrainConfig
from moetrain.model.init import init_parameters
from moetrain.model.moe.layer import moe_layers
from moetrain.model.transformer import Transformer
from moetrain.parallel.compile import apply_compile
from moetrain.parallel.context_parallel import (
    apply_context_parallel, shard_positions, shard_sequence,
)
from moetrain.parallel.data_parallel import ReplicatedGradReducer, apply_fsdp
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import apply_expert_parallel, distribute_expert_weights
from moetrain.parallel.grad_norm import grad_sq_norm_share
from moetrain.parallel.mesh import Meshes, build_meshes
from moetrain.parallel.pipeline.stages import build_stage_modules
from moetrain.parallel.steps import MicroBatchSteps, PipelineSteps, StepRunner
from moetrain.parallel.tensor_parallel import apply_tensor_parallel


def lbl_count_group(scope: str) -> str:
    """The group kind over which a MoE layer sums its LBL counts, by `model.moe.lbl.scope`: the
    ranks holding the other tokens of the scope's unit. A micro-batch (and each of its
    sequences) is split over CP x TP (sequence parallelism); the global scope's unit is the
    step, every rank of the pipeline stage. The one place that maps scopes to groups."""
    return "dp_cp_tp" if scope == "global" else "cp_tp"


@dataclass
class StepSums:
    """A step's sums over every rank (`ParallelContext.step_sums`)."""

    lm_sum: float  # LM cross-entropy summed over the global batch's tokens
    grad_norm: float  # L2 norm of the whole model's gradient, before clipping
    stop: bool  # some rank asked to stop (a signal, train.max_time)
    moe_rows: Optional[torch.Tensor]  # [L, C] MoE statistics rows, on the device
    moe_rows_host: Optional[torch.Tensor]  # the same, on the host
    rank_values: list[float]  # every rank's `rank_value`, by rank
    maxima: Optional[torch.Tensor] = None  # the `maxima` table's maximum over the ranks, device
    maxima_host: Optional[list[float]] = None  # the same, flattened, on the host


class ParallelContext:
    """One rank's view of the layout: meshes, its coordinates and the collectives it needs."""

    def __init__(self, dims: ParallelDims, device: torch.device) -> None:
        self.dims, self.device = dims, device
        self.rank = dist.get_rank() if dims.world_size > 1 else 0
        self.meshes: Optional[Meshes] = (
            build_meshes(dims, device.type) if dims.world_size > 1 else None)
        coord = dims.dense_coord(self.rank)
        self.dp_rank, self.cp_rank, self.tp_rank, self.pp_rank = (
            coord.dp, coord.cp, coord.tp, coord.pp)
        self.dp_size = dims.dp
        self.steps: Optional[StepRunner] = None
        self._fsdp_units: list = []
        self._reducer: Optional[ReplicatedGradReducer] = None
        self._model: Optional[nn.Module] = None  # what `parallelize` returned
        self._roots: list[nn.Module] = []  # the modules it parallelized (FSDP roots)
        self._replicated = False

    # ------------------------------------------------------------------ model
    def build_model(self, cfg: MoetrainConfig) -> nn.Module:
        """This rank's model, ready for the optimizer: built on the meta device, parallelized
        there (`parallelize`), then only this rank's shards are allocated on its device
        (`materialize`) and initialised from `train.seed` (moetrain/model/init.py: the same
        weights for every layout). docs/initialisation.md."""
        with torch.device("meta"):
            model = Transformer(cfg.model)
        model = self.parallelize(model, cfg)
        self.materialize()
        init_parameters(model, cfg.model, cfg.train.seed)
        return model

    def parallelize(self, model: nn.Module, cfg: MoetrainConfig) -> nn.Module:
        """Apply the layout to the plain model on the meta device (nothing is allocated); returns
        what the trainer takes as the model (under PP this rank's stages as one module with the
        full model's names; `model` gives its blocks to them). `materialize` next."""
        if not all(p.is_meta for p in model.parameters()):
            raise ValueError("parallelize takes a model on the meta device (build_model): each "
                             "rank allocates only its own shards afterwards")
        dims, t = self.dims, cfg.train
        if dims.pp == 1:
            self._parallelize_stage(model, cfg)
            self.steps = MicroBatchSteps(self)
            self._roots = [model]
        else:
            stage_modules = build_stage_modules(model, self.pp_rank, dims.pp, dims.vpp,
                                                cfg.parallel.pp_layers)
            for sm in stage_modules:
                self._parallelize_stage(sm.module, cfg)
            self.steps = PipelineSteps(
                self, stage_modules, schedule=cfg.parallel.pp_schedule,
                n_microbatches=t.global_batch_size // (t.micro_batch_size * dims.dp),
                micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len // dims.cp,
                model_cfg=cfg.model)
            model = self.steps.model
            self._roots = [sm.module for sm in stage_modules]
        self._model, self._replicated = model, not cfg.parallel.fsdp.enabled
        return model

    def materialize(self) -> None:
        """Allocate this rank's shards of the parallelized model on its device, uninitialised
        (`to_empty` on each FSDP root, so FSDP2 re-points its sharded storage)."""
        assert self._model is not None, "parallelize first"
        for root in self._roots:
            _to_empty(root, self.device)
        if self.meshes is not None and self._replicated:
            self._reducer = ReplicatedGradReducer(self._model, self.meshes)

    def _parallelize_stage(self, module: nn.Module, cfg: MoetrainConfig) -> None:
        """EP, TP, CP, the MoE layers' wiring, compilation, FSDP: on the full model or one
        pipeline stage."""
        dims, meshes = self.dims, self.meshes
        if meshes is None:
            if cfg.train.compile:
                apply_compile(module)
            return
        if dims.ep * dims.etp > 1:  # on the meta weights, before anything wraps them
            apply_expert_parallel(module, meshes.group("ep"),
                                  meshes.group("etp") if dims.etp > 1 else None)
            distribute_expert_weights(module, meshes.experts)
        if dims.tp > 1:
            apply_tensor_parallel(module, meshes.mesh("tp"))
        if dims.cp > 1:
            apply_context_parallel(module, meshes.group("cp"), cfg.parallel.cp_comm)
        kind = lbl_count_group(cfg.model.moe.lbl.scope)
        sum_counts = self._sum_over(kind) if dims.size(kind) > 1 else None
        for layer in moe_layers(module):
            layer.use_layout(token_shards=dims.cp_tp, sum_counts=sum_counts)
        if cfg.train.compile:  # inside FSDP's hooks, outside the layout's module swaps
            apply_compile(module)
        fsdp = cfg.parallel.fsdp
        if fsdp.enabled:
            self._fsdp_units += apply_fsdp(module, meshes, fsdp.reshard_after_forward)

    # ------------------------------------------------------------------ one step
    def forward_backward(
        self, model: nn.Module, batches: Sequence[torch.Tensor], tokens_per_step: int,
        autocast: Callable[[], ContextManager],
    ) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches of one optimizer step.

        batches: token ids [micro_batch, S + 1] each, in order. Each micro-batch's summed LM
        loss is backpropagated divided by `tokens_per_step` (the global batch's tokens), so
        gradients summed over micro-batches and ranks are those of the global mean; every
        gradient reduction has run when it returns. Returns this rank's fp64 LM loss sum
        (zero where it computes no loss: the pipeline's other stages) for `sum_over_tokens`.
        """
        assert self.steps is not None, "parallelize first"
        return self.steps.forward_backward(model, batches, tokens_per_step, autocast)

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Sequence[torch.Tensor],
                  autocast: Callable[[], ContextManager]) -> torch.Tensor:
        """[LM loss sum, targets] (fp64) of this rank's tokens of the given micro-batches (model
        in eval mode), for `sum_over_tokens`."""
        assert self.steps is not None, "parallelize first"
        return self.steps.eval_sums(model, batches, autocast)

    def shard_batch(
        self, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(inputs, targets, positions) of this rank's part of token ids [B, S + 1]: the
        sequences shifted by one and, under CP, this rank's chunks with their true positions
        (None = 0..S-1)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        cp, r = self.dims.cp, self.cp_rank
        if cp == 1:
            return inputs, targets, None
        positions = shard_positions(inputs.shape[1], r, cp, device=inputs.device)
        return shard_sequence(inputs, r, cp), shard_sequence(targets, r, cp), positions

    @contextmanager
    def grad_sync(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce gradients only when `last`."""
        for unit in self._fsdp_units:  # FSDP accumulates unreduced gradients until `last`
            unit.set_requires_gradient_sync(last, recurse=False)
        yield
        if last:
            self.reduce_replicated_grads()

    def reduce_replicated_grads(self) -> None:
        """Sum the gradients of replicated (non-FSDP) data parallelism; no-op otherwise."""
        if self._reducer is not None:
            self._reducer.reduce()

    def loss_context(self) -> ContextManager:
        """Around forward, `cross_entropy_sum` and backward (vocab-parallel loss under TP)."""
        return loss_parallel() if self.dims.tp > 1 else nullcontext()

    @staticmethod
    def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed LM cross-entropy of logits [B, S, V] against targets [B, S], an fp32 scalar;
        call inside `loss_context()`. Under TP the logits are vocab-sharded and the sum is a
        DTensor replicated over TP: its local value is the whole micro-batch's (and backward
        through to_local gives each replica the same gradient)."""
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return loss.to_local() if isinstance(loss, DTensor) else loss

    # ------------------------------------------------------------------ reductions
    def all_reduce(self, tensor: torch.Tensor, kind: Optional[str] = None,
                   op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or `op`) a tensor over this rank's group of `kind` (a GROUP_KINDS name; None =
        every rank), on the group's device, into a new tensor on the input's device."""
        if self.meshes is None or (kind is not None and self.dims.size(kind) == 1):
            return tensor
        out = tensor.to(self.device, copy=True)  # NCCL needs device tensors; never in place
        dist.all_reduce(out, op=op, group=self.meshes.group(kind) if kind else None)
        return out.to(tensor.device)

    def _sum_over(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: self.all_reduce(t, kind)

    def step_sums(self, model: nn.Module, lm_sum: torch.Tensor, stop: bool,
                  moe_rows: Optional[torch.Tensor], rank_value: float = 0.0,
                  maxima: Optional[torch.Tensor] = None) -> "StepSums":
        """Everything a step decides and logs, summed over the ranks with ONE all-reduce and
        read by the host ONCE: the LM loss sum (`sum_over_tokens`), the squared gradient norm
        (each rank's `grad_sq_norm_share`), the stop flag (any rank), every rank's
        `rank_value` (its peak memory: each rank fills its own slot of a world-size vector, so
        the sum carries them all) and the MoE statistics rows. The rows also come back on the
        device (for the expert bias).

        Who contributes what: every rank its MoE rows (all ranks route different tokens - DP,
        CP, and TP under sequence parallelism - or hold different layers - PP; EP and ETP move
        tokens inside a layer without changing whose they are) and its norm share; only TP
        rank 0 of the last stage the loss sum.

        `maxima` (any shape, e.g. the attention heads' largest logits [L, H]): values whose
        maximum over the ranks is wanted, each entry given by the ranks that computed it and
        zero elsewhere (`_maxima_slots`)."""
        device = lm_sum.device
        loss = lm_sum if self._holds_loss() else torch.zeros_like(lm_sum)
        stages = self.dims.world_size // self.dims.pp
        world = self.dims.world_size
        per_rank = torch.zeros(world, dtype=torch.float64, device=device)
        per_rank[self.rank] = float(rank_value)
        parts = [loss.reshape(1).to(device, torch.float64),
                 grad_sq_norm_share(model.parameters(), stages, device).reshape(1),
                 torch.full((1,), float(stop), dtype=torch.float64, device=device), per_rank]
        first_max = 3 + world
        if maxima is not None:
            parts.append(self._maxima_slots(maxima.to(device, torch.float64)))
        first_row = sum(p.numel() for p in parts)
        if moe_rows is not None:
            parts.append(moe_rows.reshape(-1).to(device, torch.float64))
        summed = self.all_reduce(torch.cat(parts))
        host = summed.tolist()  # the step's one host read
        rows = rows_host = None
        if moe_rows is not None:
            rows = summed[first_row:].view(moe_rows.shape)
            rows_host = torch.tensor(host[first_row:], dtype=torch.float64).view(moe_rows.shape)
        step_max = step_max_host = None
        if maxima is not None:
            slots = self.dims.dp * self.dims.cp
            step_max = summed[first_max:first_row].view(slots, -1).amax(0).view(maxima.shape)
            step_max_host = [max(column) for column in zip(
                *[host[first_max + s * maxima.numel():first_max + (s + 1) * maxima.numel()]
                  for s in range(slots)])]
        return StepSums(lm_sum=host[0], grad_norm=math.sqrt(host[1]), stop=host[2] > 0,
                        moe_rows=rows, moe_rows_host=rows_host, rank_values=host[3:first_max],
                        maxima=step_max, maxima_host=step_max_host)

    def _maxima_slots(self, values: torch.Tensor) -> torch.Tensor:
        """`values` in this rank's slot of [dp x cp, N], flattened. The dp x cp ranks are the
        ones computing the same entry from different tokens; the TP ranks and pipeline stages
        sharing a slot fill disjoint entries. Summed over every rank each slot holds one
        rank's values, and the maximum over the slots is exact - a maximum inside the step's
        one sum (the slots cost dp x cp x N values)."""
        out = values.new_zeros(self.dims.dp * self.dims.cp, values.numel())
        out[self.dp_rank * self.dims.cp + self.cp_rank] = values.reshape(-1)
        return out.reshape(-1)

    def _holds_loss(self) -> bool:
        # TP ranks share their micro-batch's loss; pipeline stages but the last have none.
        return self.tp_rank == 0 and (self.steps is None or self.steps.computes_loss)

    def sum_over_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-token statistics of the LM loss (a loss sum, a target count) over the ranks
        that compute them for different tokens: DP x CP. TP ranks share their micro-batch's
        loss and pipeline stages other than the last have none, so only tp rank 0 of the last
        stage contributes; one collective over every rank."""
        if self.meshes is None:
            return values
        return self.all_reduce(values if self._holds_loss() else torch.zeros_like(values))

    def max_over_ranks(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum over every rank of a few integers, in one collective and one
        host read (once, after initialisation; a step's values ride in `step_sums`)."""
        t = torch.tensor(list(values), dtype=torch.int64)
        return self.all_reduce(t, op=dist.ReduceOp.MAX).tolist()


def _to_empty(module: nn.Module, device: torch.device) -> None:
    """`module.to_empty(device=device)`, keeping tied parameters tied: `Module._apply` gives each
    owning module its own new plain parameter (DTensors are swapped in place and stay tied)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, name))
    module.to_empty(device=device)
    for places in owners.values():
        first = places[0][0]._parameters[places[0][1]]
        for m, name in places[1:]:
            if m._parameters[name] is not first:
                m._parameters[name] = first


__all__ = ["ParallelContext", "StepSums", "lbl_count_group"]
