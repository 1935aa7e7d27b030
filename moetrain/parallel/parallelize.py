"""Apply a layout to the plain model: the one entry of the training code into `parallel/`.

    with torch.device("meta"):
        model = Transformer(cfg.model)
    model, runner = parallelize(model, rank, cfg.parallel, batch, compile=cfg.train.compile)
    init_parameters(model, cfg.model, seed)       # this rank's shards (moetrain/model/init.py)

`parallelize` takes the model on the meta device, applies expert, tensor and context parallelism,
wires the MoE layers to the layout (`MoELayer.use_layout`), compiles, applies FSDP2 (sharded or
replicated data parallelism) and, under pipeline parallelism, cuts this rank's stages and builds
the schedule; then it allocates this rank's shards on its device, uninitialised. It returns what
the trainer takes as the model and the step runner (moetrain/parallel/step.py) that owns
everything else of a step that depends on the layout. Which ranks reduce what:
docs/parallelism.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config.schema import ParallelConfig
from moetrain.model.moe.layer import moe_layers
from moetrain.model.moe.losses import STEP
from moetrain.parallel.compile import apply_compile
from moetrain.parallel.context_parallel import apply_context_parallel
from moetrain.parallel.data_parallel import apply_data_parallel
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.pipeline.schedule import build_pipeline
from moetrain.parallel.pipeline.stages import build_stage_modules
from moetrain.parallel.rank import RankLayout
from moetrain.parallel.step import PipelineStepRunner, StepRunner, cross_entropy_sum
from moetrain.parallel.tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True)
class BatchShape:
    """The shape of one data-parallel rank's work per optimizer step (what a pipeline schedule
    declares statically): `micro_batches` of `micro_batch_size` sequences of `seq_len` tokens
    (the whole sequence, before context parallelism splits it)."""

    micro_batch_size: int
    micro_batches: int
    seq_len: int


def parallelize(model: nn.Module, rank: RankLayout, parallel: ParallelConfig, batch: BatchShape,
                *, compile: bool = False) -> tuple[nn.Module, StepRunner]:
    """Apply the layout to `model` (a `Transformer` on the meta device) and allocate this rank's
    shards on `rank.device` (uninitialised; on the meta device nothing is allocated).

    Returns (the model the trainer takes: under PP this rank's stages as one module with the
    full model's parameter names, `model` having given its blocks to them; the step runner).
    Raises ValueError for a model not on the meta device.
    """
    if not all(p.is_meta for p in model.parameters()):
        raise ValueError("parallelize takes a model on the meta device: each rank allocates "
                         "only its own shards afterwards")
    dims = rank.dims
    if dims.pp == 1:
        units = _parallelize_stage(model, rank, parallel, compile)
        roots, runner = [model], StepRunner(rank, units)
    else:
        stage_modules = build_stage_modules(model, rank.pp_rank, dims.pp, dims.vpp,
                                            parallel.pp_layers)
        units = [u for sm in stage_modules
                 for u in _parallelize_stage(sm.module, rank, parallel, compile)]
        shell = stage_modules[0].module
        pipe = build_pipeline(
            stage_modules, schedule=parallel.pp_schedule, group=rank.meshes.group("pp"),
            device=rank.device, n_microbatches=batch.micro_batches,
            micro_batch_size=batch.micro_batch_size, seq_len=batch.seq_len // dims.cp,
            d_model=shell.cfg.d_model, vocab_size=shell.cfg.vocab_size,
            tokens_per_step=0,  # set per step
            cross_entropy_sum=cross_entropy_sum, sequence_shards=dims.tp)
        model = pipe.model
        roots, runner = [sm.module for sm in stage_modules], PipelineStepRunner(rank, pipe, units)
    if rank.device.type != "meta":
        for root in roots:
            _to_empty(root, rank.device)
    return model, runner


def _parallelize_stage(module: nn.Module, rank: RankLayout, parallel: ParallelConfig,
                       compile: bool) -> list:
    """EP, TP, CP, the MoE layers' layout, compilation, FSDP: on the full model or one pipeline
    stage. Returns the FSDP units."""
    dims, meshes = rank.dims, rank.meshes
    if meshes is None:
        if compile:
            apply_compile(module)
        return []
    if dims.ep * dims.etp > 1:  # on the meta weights, before anything wraps them
        apply_expert_parallel(module, meshes.experts)
    if dims.tp > 1:
        apply_tensor_parallel(module, meshes.mesh("tp"))
    if dims.cp > 1:
        apply_context_parallel(module, meshes.group("cp"), parallel.cp_comm)
    for layer in moe_layers(module):
        # The ranks holding the other tokens of the LBL's count unit: those splitting a
        # micro-batch (CP x TP under sequence parallelism), or every rank of the step's stage.
        kind = "dp_cp_tp" if layer.lbl.counts_unit == STEP else "cp_tp"
        layer.use_layout(token_shards=dims.cp_tp, sum_counts=rank.sum_over(kind))
    if compile:  # inside FSDP's hooks, outside the layout's module swaps
        apply_compile(module)
    fsdp = parallel.fsdp
    return apply_data_parallel(module, meshes, shard=fsdp.enabled,
                               reshard_after_forward=fsdp.reshard_after_forward)


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
