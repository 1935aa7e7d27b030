"""Apply a layout to the plain model: the one entry of the training code into `parallel/`.

    with torch.device("meta"):
        model = Transformer(cfg.model)
    model, runner = parallelize(model, rank, cfg.parallel, batch, compile=cfg.train.compile,
                                fp8=resolve_fp8(cfg.train, device))
    init_parameters(model, cfg.model, seed)       # this rank's shards (moetrain/model/init.py)

`parallelize` takes the model on the meta device, converts it to FP8 (train.fp8: before anything
shards it, so that FSDP2's float8 all-gather applies and every scale is the whole tensor's;
moetrain/fp8), applies expert, tensor and context parallelism,
wires the MoE layers to the layout (`MoELayer.use_layout`), compiles, applies FSDP2 (sharded or
replicated data parallelism) and, under pipeline parallelism, cuts this rank's stages and builds
the schedule; then it allocates this rank's shards on its device, uninitialised. It returns what
the trainer takes as the model and the step runner (moetrain/parallel/step.py) that owns
everything else of a step that depends on the layout. Which ranks reduce what:
docs/parallelism.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.config.schema import ParallelConfig
from moetrain.fp8 import FP8Plan, apply_fp8
from moetrain.model.inputs import InputSpec
from moetrain.model.moe.layer import moe_layers
from moetrain.model.moe.losses import STEP
from moetrain.parallel.checks import fsdp_reshards_after_forward
from moetrain.parallel.compile import apply_compile
from moetrain.parallel.context_parallel import apply_context_parallel
from moetrain.parallel.data_parallel import apply_data_parallel
from moetrain.parallel.dims import LayoutError
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.loss import StepLoss
from moetrain.parallel.pipeline.schedule import build_pipeline
from moetrain.parallel.pipeline.stages import build_stage_modules, last_stage_embeds
from moetrain.parallel.rank import RankLayout
from moetrain.parallel.step import PipelineStepRunner, StepRunner
from moetrain.parallel.tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True)
class BatchShape:
    """The shape of one data-parallel rank's work per optimizer step (what a pipeline schedule
    declares statically): `micro_batches` of `micro_batch_size` sequences of `seq_len` tokens
    (the whole sequence, before context parallelism splits it), and how each window becomes
    model inputs and targets (`inputs`: documents, MTP; moetrain/model/inputs.py)."""

    micro_batch_size: int
    micro_batches: int
    seq_len: int
    inputs: InputSpec = field(default_factory=InputSpec)


def parallelize(model: nn.Module, rank: RankLayout, parallel: ParallelConfig, batch: BatchShape,
                *, compile: bool = False,
                fp8: Optional[FP8Plan] = None) -> tuple[nn.Module, StepRunner]:
    """Apply the layout to `model` (a `Transformer` on the meta device) and allocate this rank's
    shards on `rank.device` (uninitialised; on the meta device nothing is allocated). `fp8`:
    compute in FP8 (`moetrain.fp8.resolve_fp8`; None: high precision).

    Returns (the model the trainer takes: under PP this rank's stages as one module with the
    full model's parameter names, `model` having given its blocks to them; the step runner).
    Raises ValueError for a model not on the meta device, LayoutError for an FP8 linear whose
    tensor-parallel shard is not a multiple of the recipe's alignment.
    """
    if not all(p.is_meta for p in model.parameters()):
        raise ValueError("parallelize takes a model on the meta device: each rank allocates "
                         "only its own shards afterwards")
    dims = rank.dims
    # The sync-free all-to-all where the model has an expert-parallel budget.
    sync_free = model.cfg.moe.ep_budget is not None
    if dims.pp == 1:
        units = _parallelize_stage(model, rank, parallel, compile, sync_free, fp8)
        roots, runner = [model], StepRunner(rank, units, batch.inputs)
    else:
        cfg = model.cfg
        stage_modules = build_stage_modules(model, rank.pp_rank, dims.pp, dims.vpp,
                                            parallel.pp_layers)
        units = [u for sm in stage_modules
                 for u in _parallelize_stage(sm.module, rank, parallel, compile, sync_free,
                                             fp8)]
        pipe = build_pipeline(
            stage_modules, schedule=parallel.pp_schedule, group=rank.meshes.group("pp"),
            device=rank.device, n_microbatches=batch.micro_batches,
            micro_batch_size=batch.micro_batch_size, seq_len=batch.seq_len // dims.cp,
            d_model=cfg.d_model, vocab_size=cfg.vocab_size,
            loss=StepLoss(batch.inputs.mtp_depth), sequence_shards=dims.tp)
        model = pipe.model
        roots = [sm.module for sm in stage_modules]
    if rank.device.type != "meta":
        for root in roots:
            _to_empty(root, rank.device)
    if dims.pp > 1:  # after allocation: the parameter objects are final
        shared = _shared_embedding(stage_modules, rank) if last_stage_embeds(cfg) else None
        runner = PipelineStepRunner(rank, pipe, units, batch.inputs, shared)
    return model, runner


def _shared_embedding(stage_modules: list, rank: RankLayout,
                      ) -> Optional[tuple[nn.Parameter, dist.ProcessGroup]]:
    """This rank's copy of the embedding the first and last pipeline stage share, and the group
    of the two stages' ranks of this (dp, cp, tp) coordinate (every rank takes part in making
    the groups; a middle stage's rank holds no copy: None)."""
    dims = rank.dims
    if dims.pp == 2:
        group = rank.meshes.group("pp")
    else:  # the first and last rank of every pp group (one collective call on every rank)
        stride = dims.world_size // dims.pp  # pp varies slowest (docs/design.md, rank order)
        pairs = [[r, r + (dims.pp - 1) * stride] for r in range(stride)]
        group, _ = dist.new_subgroups_by_enumeration(pairs)
    holder = next((sm.module for sm in stage_modules if sm.is_first or sm.is_last), None)
    if holder is None:
        return None
    return holder.tok_embeddings.weight, group


def _parallelize_stage(module: nn.Module, rank: RankLayout, parallel: ParallelConfig,
                       compile: bool, sync_free: bool, fp8: Optional[FP8Plan] = None) -> list:
    """FP8, EP, TP, CP, the MoE layers' layout, compilation, FSDP: on the full model or one
    pipeline stage. Returns the FSDP units."""
    dims, meshes = rank.dims, rank.meshes
    fp8_linears: list[str] = []
    if fp8 is not None:  # first: TP and FSDP then shard float8 linears (torchtitan's order)
        sharded = meshes is not None and parallel.fsdp.enabled and dims.dp_cp > 1
        fp8_linears = apply_fp8(module, fp8.with_fsdp_all_gather(sharded))
    if meshes is None:
        if compile:
            apply_compile(module)
        return []
    if dims.ep * dims.etp > 1:  # on the meta weights, before anything wraps them
        apply_expert_parallel(module, meshes.experts, sync_free=sync_free)
    if dims.tp > 1:
        apply_tensor_parallel(module, meshes.mesh("tp"))
        if fp8 is not None:
            _check_fp8_shards(module, fp8, fp8_linears, dims.tp)
    if dims.cp > 1:
        apply_context_parallel(module, meshes.group("cp"), parallel.cp_comm)
    for layer in moe_layers(module):  # the MTP modules' MoE layers too
        # The ranks holding the other tokens of the LBL's count unit: those splitting a
        # micro-batch (CP x TP under sequence parallelism), or every rank of the step's stage.
        kind = "dp_cp_tp" if layer.lbl.counts_unit == STEP else "cp_tp"
        layer.use_layout(token_shards=dims.cp_tp, sum_counts=rank.sum_over(kind))
    if compile:  # inside FSDP's hooks, outside the layout's module swaps
        apply_compile(module)
    return apply_data_parallel(module, meshes, shard=parallel.fsdp.enabled,
                               reshard_after_forward=fsdp_reshards_after_forward(parallel))


def _check_fp8_shards(module: nn.Module, fp8: FP8Plan, names: list[str], tp: int) -> None:
    """Every tensor-parallel shard of an FP8 linear must keep the recipe's alignment (the FP8
    GEMMs' 16-byte rows; MXFP8's 32-element blocks along both weight dimensions)."""
    for name in names:
        weight = module.get_submodule(name).weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        for dim, what in ((0, "output"), (1, "input")):
            if local.shape[dim] % fp8.alignment:
                raise LayoutError(
                    f"train.fp8={fp8.recipe} with parallel.tp={tp}: {name} holds "
                    f"{local.shape[dim]} of its {weight.shape[dim]} {what} features per rank, "
                    f"not a multiple of {fp8.alignment}; use a smaller parallel.tp",
                    ("train.fp8", "parallel.tp"))


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


__all__ = ["BatchShape", "parallelize"]
