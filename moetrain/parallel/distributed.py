"""`ParallelContext`s for more than one process: EP/ETP, TP + SP, CP, data parallelism, and PP.

`parallelize` applies, in order, to the full model (or, under PP, to each pipeline stage):
expert parallelism (`expert_parallel`: slice the experts, all-to-all dispatcher, expert weights
as DTensors on the MoE mesh), tensor + sequence parallelism (`tensor_parallel`), context
parallelism (`context_parallel`: attention over the CP group's whole sequence), the MoE layers'
token statistics wiring (below), then FSDP2 or replicated data parallelism (`data_parallel`).
The trainer's loss scaling makes every gradient reduction a plain sum. `PipelineContext` adds
the pipeline: stages, a schedule instead of the micro-batch loop, sums over the stages.

Which ranks hold which tokens (what the statistics reductions follow):
- DP ranks hold different micro-batches; CP ranks hold different chunks of the same sequences
  (`shard_batch`: inputs, targets and their true positions); TP ranks (sequence parallelism)
  hold different positions of the CP rank's chunk. The LM loss, computed by `loss_parallel`
  for the CP rank's whole chunk on every TP rank, is summed over dp_cp (`all_reduce_tokens`);
  MoE routing statistics, which each TP rank computes for its own positions, are summed over
  dp_cp_tp (`all_reduce_routing`). Nothing is counted twice. EP moves tokens to experts and
  back inside a layer: it changes no rank's tokens.
- Each MoE layer's LBL counts (`lbl.reduce_counts`) are summed over the ranks sharing its unit:
  the cp_tp group for the micro and seq scopes (a micro-batch / sequence is split over CP x
  TP), dp_cp_tp for the global scope; `MoELayer.token_shards` = cp * tp makes each rank's aux
  losses its share of the micro-batch's, so the sums over ranks are exact (see moe/losses.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.config.schema import MoetrainConfig
from moetrain.model.moe.layer import MoEStats, moe_layers
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.context_parallel import (
    apply_context_parallel, shard_positions, shard_sequence,
)
from moetrain.parallel.data_parallel import ReplicatedGradReducer, apply_fsdp
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import apply_expert_parallel, distribute_expert_weights
from moetrain.parallel.grad_norm import clip_grad_norm_
from moetrain.parallel.mesh import build_meshes
from moetrain.parallel.pipeline import (
    Pipeline, build_pipeline, build_stage_modules, pipeline_eval_step, pipeline_train_step,
    reduce_over_pp,
)
from moetrain.parallel.tensor_parallel import apply_tensor_parallel


class DistributedContext(ParallelContext):
    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        super().__init__(dims, device_type)
        if device_type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(device_type)
        self.meshes = build_meshes(dims, device_type)
        self.rank = dist.get_rank()
        coord = dims.dense_coord(self.rank)
        self.dp_rank, self.cp_rank = coord.dp, coord.cp
        self.dp_size = dims.dp
        self._fsdp_units: list = []
        self._reducer: ReplicatedGradReducer | None = None

    # ------------------------------------------------------------------ model
    def parallelize(self, model: nn.Module, cfg: MoetrainConfig) -> nn.Module:
        self._parallelize_stage(model, cfg)
        if not cfg.parallel.fsdp.enabled:
            self._reducer = ReplicatedGradReducer(model, self.meshes)
        return model

    def _parallelize_stage(self, module: nn.Module, cfg: MoetrainConfig) -> None:
        """EP, TP, CP, statistics wiring, FSDP: on the full model or one pipeline stage."""
        dims, meshes = self.dims, self.meshes
        if dims.ep * dims.etp > 1:  # on the full weights, before anything wraps them
            apply_expert_parallel(module, meshes.group("ep"),
                                  meshes.group("etp") if dims.etp > 1 else None)
            distribute_expert_weights(module, meshes.experts)
        if dims.tp > 1:
            apply_tensor_parallel(module, meshes.mesh("tp"))
        if dims.cp > 1:
            apply_context_parallel(module, meshes.group("cp"), cfg.parallel.cp_comm)
        self._wire_moe_statistics(module, cfg.model.moe.lbl.scope)
        fsdp = cfg.parallel.fsdp
        if fsdp.enabled:
            self._fsdp_units += apply_fsdp(module, meshes, fsdp.reshard_after_forward)

    def _wire_moe_statistics(self, model: nn.Module, scope: str) -> None:
        kind = "dp_cp_tp" if scope == "global" else "cp_tp"
        reduce = None
        if self.dims.size(kind) > 1:
            reduce = _sum_over(self.meshes.group(kind), self.device)
        for layer in moe_layers(model):
            layer.token_shards = self.dims.cp_tp
            if reduce is not None:
                layer.lbl.reduce_counts = reduce

    @contextmanager
    def grad_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        for unit in self._fsdp_units:  # FSDP accumulates unreduced gradients until `last`
            unit.set_requires_gradient_sync(last, recurse=False)
        yield
        if last and self._reducer is not None:
            self._reducer.reduce()

    # ------------------------------------------------------------------ data and loss
    def shard_batch(self, batch: torch.Tensor):
        inputs, targets, _ = super().shard_batch(batch)
        cp, r = self.dims.cp, self.cp_rank
        if cp == 1:
            return inputs, targets, None
        positions = shard_positions(inputs.shape[1], r, cp, device=inputs.device)
        return shard_sequence(inputs, r, cp), shard_sequence(targets, r, cp), positions

    def loss_context(self):
        return loss_parallel() if self.dims.tp > 1 else nullcontext()

    def cross_entropy_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().cross_entropy_sum(logits, targets)
        # Under loss_parallel the sum is a DTensor replicated over TP; its local value is the
        # whole micro-batch's (and backward through to_local gives each replica the same grad).
        return loss.to_local() if isinstance(loss, DTensor) else loss

    # ------------------------------------------------------------------ statistics
    def all_reduce_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, "dp_cp")

    def all_reduce_routing(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, "dp_cp_tp")

    def _all_reduce(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        if self.dims.size(kind) == 1:
            return tensor
        out = tensor.to(self.device, copy=True)  # NCCL needs device tensors; never in place
        dist.all_reduce(out, group=self.meshes.group(kind))
        return out.to(tensor.device)

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        stages = self.meshes.group("pp") if self.dims.pp > 1 else None
        return clip_grad_norm_(model.parameters(), max_norm, stage_group=stages)


class PipelineContext(DistributedContext):
    """Pipeline parallelism (pp > 1): `parallelize` cuts the model into this rank's stages,
    parallelizes each like a whole model and returns their `RankModel` (full-model parameter
    names: optimizer, checkpoints and clipping take it as "the model"); `forward_backward` and
    `eval_sums` run the schedule over the step's micro-batches stacked; the LM loss sum comes
    from the last stage and the MoE statistics from every stage (in the full model's layer
    order), so the trainer's reductions after them are those of the other layouts."""

    pipeline: Pipeline

    def parallelize(self, model: nn.Module, cfg: MoetrainConfig) -> nn.Module:
        dims, t = self.dims, cfg.train
        pp_rank = dims.dense_coord(self.rank).pp
        stage_modules = build_stage_modules(model, pp_rank, dims.pp, dims.vpp)
        for sm in stage_modules:
            self._parallelize_stage(sm.module, cfg)
        self.pipeline = build_pipeline(
            stage_modules, schedule=cfg.parallel.pp_schedule, group=self.meshes.group("pp"),
            device=self.device,
            n_microbatches=t.global_batch_size // (t.micro_batch_size * dims.dp),
            micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len // dims.cp,
            tokens_per_step=t.global_batch_size * cfg.data.seq_len, model_cfg=cfg.model,
            cross_entropy_sum=self.cross_entropy_sum, sequence_shards=dims.tp)
        model = self.pipeline.model
        if not cfg.parallel.fsdp.enabled:
            self._reducer = ReplicatedGradReducer(model, self.meshes)
        return model

    def forward_backward(
        self, model: nn.Module, batches: Sequence[torch.Tensor], tokens_per_step: int,
        autocast: Callable[[], ContextManager],
    ) -> tuple[torch.Tensor, list[list[Optional[MoEStats]]]]:
        pipe = self.pipeline
        pipe.loss.tokens_per_step = tokens_per_step
        inputs, targets, positions = self.shard_batch(torch.cat(list(batches)))
        # torch's stages hold FSDP's gradient reduction until the schedule's last backward
        with self.loss_context(), autocast():
            local = pipeline_train_step(pipe, inputs, targets, positions=positions)
        if self._reducer is not None:
            self._reducer.reduce()
        stats = pipe.moe_stats.gather(len(batches), self.meshes.group("pp"))
        return reduce_over_pp(local, pipe), stats

    @torch.no_grad()
    def eval_sums(self, model, batches, autocast):
        inputs, targets, positions = self.shard_batch(torch.cat(list(batches)))
        with self.loss_context(), autocast():
            local = pipeline_eval_step(self.pipeline, inputs, targets, positions=positions)
        count = torch.tensor(float(targets.numel()), dtype=torch.float64)
        return reduce_over_pp(local, self.pipeline), count


def _sum_over(group: dist.ProcessGroup,
              device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        out = counts.to(device, copy=True)
        dist.all_reduce(out, group=group)
        return out.to(counts.device)

    return reduce


__all__ = ["DistributedContext", "PipelineContext"]
