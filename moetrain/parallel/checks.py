"""Does a config fit a layout? Model, batch and pipeline checks, before any process group exists.

    dims = check_layout(cfg, world_size)     # ParallelDims, or LayoutError naming the keys

Pure arithmetic (no torch), called by every entry point (`moetrain.train`, `moetrain.plan`,
`moetrain.layout`) after `moetrain.config.validate`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.pipeline.split import split_layers

#: Pipeline schedules that run several (virtual) stages per rank (the others run one).
MULTI_STAGE_SCHEDULES = ("interleaved", "zero_bubble")


def check_layout(cfg: Any, world_size: int) -> ParallelDims:
    """Check a whole `MoetrainConfig` (parallel, model, train, data) for a world size.

    Returns the `ParallelDims`; raises LayoutError naming the keys on the first failure.
    """
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    check_model_fit(dims, cfg.model, cfg.train, cfg.data.seq_len,
                    pp_schedule=cfg.parallel.pp_schedule,
                    pp_layers=getattr(cfg.parallel, "pp_layers", None))
    return dims


def check_model_fit(
    dims: ParallelDims,
    model: Any,
    train: Any,
    seq_len: int,
    *,
    pp_schedule: Optional[str] = None,
    pp_layers: Optional[Sequence[int]] = None,
) -> None:
    """Check that a model and batch shape split over `dims`; raise LayoutError on the first misfit.

    `model` is a `ModelConfig`, `train` a `TrainConfig` (anything with the same attributes);
    `seq_len` is `data.seq_len`. With `pp_schedule`, the pipeline schedule is checked too;
    `pp_layers` is parallel.pp_layers (null: an even split).
    """
    moe = model.moe
    if moe.num_experts % dims.ep:
        raise LayoutError(
            f"model.moe.num_experts = {moe.num_experts} is not divisible by "
            f"parallel.ep = {dims.ep}",
            ("model.moe.num_experts", "parallel.ep"),
        )
    if moe.expert_hidden % dims.etp:
        raise LayoutError(
            f"model.moe.expert_hidden = {moe.expert_hidden} is not divisible by "
            f"parallel.etp = {dims.etp}",
            ("model.moe.expert_hidden", "parallel.etp"),
        )
    if model.n_heads % dims.tp:
        raise LayoutError(
            f"model.n_heads = {model.n_heads} is not divisible by parallel.tp = {dims.tp}",
            ("model.n_heads", "parallel.tp"),
        )
    if model.n_kv_heads % dims.tp:
        raise LayoutError(
            f"model.n_kv_heads = {model.n_kv_heads} is not divisible by parallel.tp = {dims.tp}",
            ("model.n_kv_heads", "parallel.tp"),
        )
    if moe.first_dense_layers > 0 and model.ffn_hidden % dims.tp:
        raise LayoutError(
            f"model.ffn_hidden = {model.ffn_hidden} is not divisible by parallel.tp = {dims.tp}",
            ("model.ffn_hidden", "parallel.tp"),
        )
    # Sequence parallelism splits each sequence evenly over the TP ranks (and the MoE layers'
    # aux-loss shares assume equal shards).
    if dims.tp > 1 and seq_len % (dims.cp * dims.tp):
        raise LayoutError(
            f"data.seq_len = {seq_len} is not divisible by parallel.cp*parallel.tp = "
            f"{dims.cp}*{dims.tp} (sequence parallelism splits every CP rank's part of a "
            "sequence over the TP ranks)",
            ("data.seq_len", "parallel.tp", "parallel.cp"),
        )
    # Load-balanced CP splits each sequence into 2*cp chunks (rank i holds chunks i, 2cp-1-i).
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        raise LayoutError(
            f"data.seq_len = {seq_len} is not divisible by 2*parallel.cp = {2 * dims.cp}",
            ("data.seq_len", "parallel.cp"),
        )
    if dims.pp * dims.vpp > 1 or pp_layers is not None:
        split_layers(model.n_layers, dims.pp, dims.vpp, pp_layers)
    per_step = train.micro_batch_size * dims.dp
    if train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size = {train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*dp = {train.micro_batch_size}*{dims.dp} = {per_step} "
            f"(dp = world size {dims.world_size} / (parallel.tp*parallel.cp*parallel.pp))",
            ("train.global_batch_size", "train.micro_batch_size"),
        )
    if pp_schedule is not None:
        check_pipeline(pp_schedule, dims.pp, dims.vpp, train.global_batch_size // per_step,
                       tie_embeddings=bool(getattr(model, "tie_embeddings", False)))


def check_pipeline(
    schedule: str, pp: int, vpp: int, n_microbatches: int, *, tie_embeddings: bool = False
) -> None:
    """Check a pipeline schedule (`parallel.pp_schedule`, one of the schema's PPSchedule) against
    pp, vpp and the micro-batches per data-parallel rank and step (train.global_batch_size /
    (train.micro_batch_size * dp)); LayoutError naming the keys. Everything passes for pp = 1."""
    if pp * vpp == 1:
        return
    if tie_embeddings:
        raise LayoutError(
            "model.tie_embeddings = true is not supported with pipeline parallelism "
            f"(parallel.pp*parallel.vpp = {pp}*{vpp}): the embedding and the output head sit "
            "on different stages; untie them", ("model.tie_embeddings", "parallel.pp"))
    multi = schedule in MULTI_STAGE_SCHEDULES
    if not multi and vpp != 1:
        raise LayoutError(
            f"parallel.pp_schedule = {schedule} runs one stage per rank, but parallel.vpp = {vpp}; "
            f"use {' or '.join(MULTI_STAGE_SCHEDULES)}", ("parallel.pp_schedule", "parallel.vpp"))
    if schedule == "1f1b" and n_microbatches < pp:
        raise LayoutError(
            f"parallel.pp_schedule = 1f1b needs at least parallel.pp = {pp} micro-batches "
            f"per data-parallel rank, got {n_microbatches} (train.global_batch_size / "
            "(train.micro_batch_size * dp))",
            ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"))
    rounds = max(1, n_microbatches // pp)
    if multi and n_microbatches % rounds:
        raise LayoutError(
            f"parallel.pp_schedule = {schedule} needs the micro-batches per data-parallel rank "
            f"({n_microbatches}) to be a multiple of max(1, micro-batches // parallel.pp) = "
            f"{rounds}",
            ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"))


__all__ = ["MULTI_STAGE_SCHEDULES", "check_layout", "check_model_fit", "check_pipeline"]
