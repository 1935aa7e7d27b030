"""`ParallelContext` for more than one process: TP + SP and data parallelism over device meshes.

`parallelize` applies, in order: tensor + sequence parallelism (`tensor_parallel`), the MoE
layers' token statistics wiring (below), then FSDP2 or replicated data parallelism
(`data_parallel`). The trainer's loss scaling makes every gradient reduction a plain sum.

Which ranks hold which tokens (what the statistics reductions follow):
- DP ranks hold different micro-batches; TP ranks (sequence parallelism) hold different
  positions of the same micro-batch; so the LM loss, computed by `loss_parallel` for the whole
  micro-batch on every TP rank, is summed over dp_cp only (`all_reduce_tokens`), while MoE
  routing statistics, which each TP rank computes for its own positions, are summed over
  dp_cp_tp (`all_reduce_routing`). Nothing is counted twice.
- Each MoE layer's LBL counts (`lbl.reduce_counts`) are summed over the ranks sharing its unit:
  the TP group for the micro and seq scopes (the micro-batch / sequence is split over TP),
  dp_cp_tp for the global scope; `MoELayer.token_shards` = tp makes each TP rank's aux losses
  its share of the micro-batch's, so the sums over ranks are exact (see moe/losses.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.config.schema import MoetrainConfig
from moetrain.model.moe.layer import moe_layers
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.data_parallel import ReplicatedGradReducer, apply_fsdp
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.grad_norm import clip_grad_norm_
from moetrain.parallel.mesh import build_meshes
from moetrain.parallel.tensor_parallel import apply_tensor_parallel


class DistributedContext(ParallelContext):
    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        super().__init__(dims, device_type)
        _refuse_unimplemented(dims)
        if device_type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(device_type)
        self.meshes = build_meshes(dims, device_type)
        self.rank = dist.get_rank()
        self.dp_rank = dims.dense_coord(self.rank).dp
        self.dp_size = dims.dp
        self._fsdp_units: list = []
        self._reducer: ReplicatedGradReducer | None = None

    # ------------------------------------------------------------------ model
    def parallelize(self, model: nn.Module, cfg: MoetrainConfig) -> nn.Module:
        if self.dims.tp > 1:
            apply_tensor_parallel(model, self.meshes.mesh("tp"))
        self._wire_moe_statistics(model, cfg.model.moe.lbl.scope)
        fsdp = cfg.parallel.fsdp
        if fsdp.enabled:
            self._fsdp_units = apply_fsdp(model, self.meshes, fsdp.reshard_after_forward)
        else:
            self._reducer = ReplicatedGradReducer(model, self.meshes)
        return model

    def _wire_moe_statistics(self, model: nn.Module, scope: str) -> None:
        tp = self.dims.tp
        group = self.meshes.group("dp_cp_tp") if scope == "global" else self.meshes.group("tp")
        size = self.dims.dp_cp_tp if scope == "global" else tp
        reduce = _sum_over(group, self.device) if size > 1 else None
        for layer in moe_layers(model):
            layer.token_shards = tp
            if reduce is not None:
                layer.lbl.reduce_counts = reduce

    @contextmanager
    def grad_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        for unit in self._fsdp_units:  # FSDP accumulates unreduced gradients until `last`
            unit.set_requires_gradient_sync(last, recurse=False)
        yield
        if last and self._reducer is not None:
            self._reducer.reduce()

    # ------------------------------------------------------------------ loss
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


def _sum_over(group: dist.ProcessGroup, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        out = counts.to(device, copy=True)
        dist.all_reduce(out, group=group)
        return out.to(counts.device)

    return reduce


def _refuse_unimplemented(dims: ParallelDims) -> None:
    from moetrain.config.validate import ConfigError

    for key in ("cp", "pp", "ep", "etp"):
        value = getattr(dims, key)
        if value > 1:
            raise ConfigError(
                f"parallel.{key}={value} is not supported by the trainer yet "
                f"(tensor/sequence and data parallelism are); use parallel.{key}=1"
            )


__all__ = ["DistributedContext"]
