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
#: Pipeline schedules that split each backward into an input-gradient and a weight-gradient step.
SPLIT_BACKWARD_SCHEDULES = ("zero_bubble",)


def fsdp_reshards_after_forward(parallel: Any) -> bool:
    """Whether FSDP2 units free their gathered parameters after each forward:
    `parallel.fsdp.reshard_after_forward`, except under pipeline parallelism with a
    split-backward schedule. There torch's input-gradient step finds the stage's weights in the
    autograd graph by `module.parameters()` before its backward hooks run: on a resharded unit
    those are the sharded parameters, not the gathered ones the forward used, so the weight
    gradients are silently skipped. torch's runtime gathers and frees such a stage itself
    (its UNSHARD / RESHARD actions), so its units keep their parameters between forward and
    backward (docs/pipeline_parallel.md)."""
    if parallel.pp * parallel.vpp > 1 and parallel.pp_schedule in SPLIT_BACKWARD_SCHEDULES:
        return False
    return bool(parallel.fsdp.reshard_after_forward)


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
    for key, value in (("model.moe.ep_budget", moe.ep_budget is not None),
                       ("model.moe.ep_overlap", moe.ep_overlap)):
        if value and dims.ep == 1:
            raise LayoutError(
                f"{key} = {getattr(moe, key.rsplit('.', 1)[1])} needs expert parallelism "
                "(parallel.ep > 1): without it no token leaves its rank; unset it",
                (key, "parallel.ep"))
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
    mtp = getattr(model, "mtp", None)
    dense_mtp = mtp is not None and mtp.depth > 0 and mtp.block == "dense"
    if (moe.first_dense_layers > 0 or dense_mtp) and model.ffn_hidden % dims.tp:
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
    check_fp8_fit(dims, moe, train, seq_len)
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
        check_pipeline(pp_schedule, dims.pp, dims.vpp, train.global_batch_size // per_step)


def check_fp8_fit(dims: ParallelDims, moe: Any, train: Any, seq_len: int) -> None:
    """train.fp8 against the layout (docs/fp8.md, "Layouts"): every dimension an FP8 GEMM
    quantizes along must stay a multiple of the recipe's alignment (16; MXFP8's block: 32) on
    each rank, and no scale may be a shard's where it should be the whole tensor's."""
    recipe = str(getattr(train, "fp8", "none"))
    if recipe == "none":
        return
    align = 32 if recipe == "mxfp8" else 16
    expert_hidden = moe.expert_hidden
    # A tensorwise scale is the amax of the whole tensor. Weights and the DTensor activations of
    # tensor parallelism get it (DTensor reduces over the shards); plain activations that hold
    # part of a micro-batch's tokens - a CP rank's chunk of the sequence, a TP rank's positions
    # in the MoE layer's shared experts - would get their shard's.
    if recipe == "tensorwise" and dims.cp > 1:
        raise LayoutError(
            f"train.fp8=tensorwise with parallel.cp={dims.cp}: each CP rank would scale its "
            "chunk of the sequence's activations by that chunk's amax, not the tensor's; use "
            "train.fp8=rowwise or mxfp8 (their scales do not span the sequence) or parallel.cp=1",
            ("train.fp8", "parallel.cp"))
    if recipe == "tensorwise" and dims.tp > 1 and moe.num_shared_experts > 0:
        raise LayoutError(
            f"train.fp8=tensorwise with parallel.tp={dims.tp} and shared experts: each TP rank "
            "runs the shared experts on its own positions and would scale them by their amax, "
            "not the tensor's; use train.fp8=rowwise or mxfp8, or parallel.tp=1",
            ("train.fp8", "parallel.tp", "model.moe.num_shared_experts"))
    if recipe in ("tensorwise", "rowwise") and dims.etp > 1:
        raise LayoutError(
            f"train.fp8={recipe} with parallel.etp={dims.etp}: the FP8 rowwise scales of the "
            "routed experts span the hidden dimension that ETP splits, and torchao's kernels "
            "would scale each shard apart; use train.fp8=mxfp8 (its 32-element blocks stay "
            "within a shard) or parallel.etp=1", ("train.fp8", "parallel.etp"))
    if (expert_hidden // dims.etp) % align:
        raise LayoutError(
            f"train.fp8={recipe} with parallel.etp={dims.etp}: each rank's "
            f"{expert_hidden // dims.etp} of model.moe.expert_hidden = {expert_hidden} is not a "
            f"multiple of {align}", ("train.fp8", "parallel.etp", "model.moe.expert_hidden"))
    tokens = train.micro_batch_size * seq_len // (dims.cp * dims.tp)
    if tokens % align:
        raise LayoutError(
            f"train.fp8={recipe}: a rank's {tokens} tokens per micro-batch "
            f"(train.micro_batch_size*data.seq_len/(parallel.cp*parallel.tp) = "
            f"{train.micro_batch_size}*{seq_len}/({dims.cp}*{dims.tp})) are not a multiple of "
            f"{align}, along which the weight gradients are quantized",
            ("train.fp8", "train.micro_batch_size", "data.seq_len"))
    if str(getattr(train, "fp8_backend", "torchao")) == "te" and dims.tp > 1:
        raise LayoutError(
            f"train.fp8_backend=te with parallel.tp={dims.tp}: Transformer Engine's linears "
            "shard through their own process groups, not moetrain's DTensor plans; use "
            "train.fp8_backend=torchao or parallel.tp=1", ("train.fp8_backend", "parallel.tp"))


def check_pipeline(schedule: str, pp: int, vpp: int, n_microbatches: int) -> None:
    """Check a pipeline schedule (`parallel.pp_schedule`, one of the schema's PPSchedule) against
    pp, vpp and the micro-batches per data-parallel rank and step (train.global_batch_size /
    (train.micro_batch_size * dp)); LayoutError naming the keys. Everything passes for pp = 1."""
    if pp * vpp == 1:
        return
    # Tied embeddings and multi-token prediction are fine: the last stage holds a copy of the
    # embedding whose gradient is summed with the first stage's (pipeline/stages.py).
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


__all__ = ["MULTI_STAGE_SCHEDULES", "SPLIT_BACKWARD_SCHEDULES", "check_fp8_fit", "check_layout",
           "check_model_fit", "check_pipeline", "fsdp_reshards_after_forward"]
