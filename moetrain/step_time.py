"""A step-time model: compute at the GPU's dense peak times an efficiency, communication at the
NVLink or network bandwidth of each group, the pipeline's bubble, the optimizer.

    est = estimate_step(cfg, dims, gpu)     # StepEstimate: seconds, tokens/s/GPU, TFLOP/s/GPU, MFU

Per pipeline stage (its first rank, `planning.stage_first_rank`), per optimizer step:

    compute     FLOPs of the rank's layers for its tokens (forward x 3, + the recomputed forward
                under train.recompute) / (peak x MATMUL_EFFICIENCY); causal attention counted at
                the half a causal kernel computes
    exposed     the collectives moetrain issues on the critical path: tensor, context and expert
                parallelism, pipeline sends, load-balancing counts, the step's reduction (none
                of them is overlapped with compute in moetrain)
    fsdp        FSDP2's all-gathers and reduce-scatters (and, replicated, its all-reduces) run
                on their own streams, prefetched one unit ahead or launched as each unit's
                backward ends: hidden behind the stage's compute, only the excess is exposed
    optimizer   the update and the gradient norm read and write 16 B per parameter held + the
                optimizer state twice (AdamW: 32 B in all) at the HBM bandwidth

    stage time  = compute + exposed + max(0, fsdp - compute)
    step time   = max over stages of stage time x (1 + bubble / m) + optimizer
    bubble      = (pp - 1) / vpp micro-batch slots (1F1B, interleaved, GPipe; zero-bubble a
                  third of it), m = micro-batches per data-parallel rank

A collective over n ranks of one node moves at NVLink bandwidth, one that spans nodes at the
network bandwidth per GPU (`moetrain.hardware`), both times LINK_EFFICIENCY, plus LATENCY_S per
call: ring all-gather / reduce-scatter (n - 1) / n of the buffer, all-reduce twice that; an
all-to-all sends (n - 1) / n of its buffer, the part for ranks on other nodes over the network
at the same time as the rest over NVLink. The constants and what the model leaves out are in
docs/planning.md ("Step time"), with its error against published runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

from moetrain.hardware import Hardware
from moetrain.parallel.dims import ParallelDims
from moetrain.plan_comm import Collective, micro_batches, step_collectives
from moetrain.planning import (
    attention_widths, flops_per_token, layer_params, stage_first_rank,
)

#: Fraction of the dense bf16 peak moetrain's matrix multiplies reach (calibrated on one
#: published run, docs/planning.md "Step time").
MATMUL_EFFICIENCY = 0.39
#: Fraction of a link's datasheet bandwidth a collective reaches (NCCL bus bandwidth).
LINK_EFFICIENCY = 0.8
#: Fixed cost of one collective call, seconds.
LATENCY_S = 20e-6
#: Bytes the optimizer pass reads and writes per parameter held besides the optimizer state:
#: weight read and written, gradient read by the update and by the gradient norm (fp32).
#: The state is read and written once (planning.optimizer_state_bytes): 16 + 2 x 8 for AdamW.
PARAM_PASS_BYTES = 16


@dataclass
class StageTime:
    stage: int
    rank: int
    compute_s: float
    exposed_comm_s: float
    fsdp_s: float
    by_what: dict[str, float] = field(default_factory=dict)  # exposed seconds by collective

    @property
    def total_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + max(0.0, self.fsdp_s - self.compute_s)


@dataclass
class StepEstimate:
    step_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    bubble_s: float
    optimizer_s: float
    stages: list[StageTime]
    gpu: Hardware

    @property
    def slowest(self) -> StageTime:
        return max(self.stages, key=lambda s: s.total_s)


def node_of(rank: int, gpus_per_node: int) -> int:
    return rank // gpus_per_node


@functools.lru_cache(maxsize=4096)
def nodes_spanned(ranks: tuple[int, ...], gpus_per_node: int) -> int:
    return len({r // gpus_per_node for r in ranks})


@functools.lru_cache(maxsize=4096)
def _same_node(ranks: tuple[int, ...], gpus_per_node: int, rank: int) -> int:
    """Ranks of the group on `rank`'s node (itself included)."""
    node = rank // gpus_per_node
    return sum(1 for r in ranks if r // gpus_per_node == node)


def collective_seconds(c: Collective, gpu: Hardware, rank: int) -> float:
    """Seconds of one call of `c` on `rank` (module docstring)."""
    n = c.size
    if n == 1:
        return 0.0
    nvlink = gpu.nvlink_gb_s * 1e9 * LINK_EFFICIENCY
    net = gpu.network_gb_s * 1e9 * LINK_EFFICIENCY
    crosses = nodes_spanned(c.ranks, gpu.gpus_per_node) > 1
    bw = net if crosses else nvlink
    if c.op == "all_to_all":
        local = _same_node(c.ranks, gpu.gpus_per_node, rank)
        t = max((local - 1) / n * c.bytes / nvlink, (n - local) / n * c.bytes / net)
    elif c.op in ("all_gather", "reduce_scatter"):
        t = (n - 1) / n * c.bytes / bw
    elif c.op == "all_reduce":
        t = 2 * (n - 1) / n * c.bytes / bw
    else:  # send / recv: to the neighbouring stage
        t = c.bytes / bw
    return t + LATENCY_S


def rank_forward_flops(cfg: Any, dims: ParallelDims, rank: int, top_k: int) -> tuple[float, float]:
    """(forward FLOPs of one micro-batch on `rank`, of which inside MoE layers), with causal
    attention at half: every rank of a stage computes 1 / (cp tp) of its layers' work on the
    micro-batch (TP splits the matmuls, SP / EP / ETP the MoE tokens, CP the sequence)."""
    from moetrain.plan_shards import stage_modules

    model, moe = cfg.model, cfg.model.moe
    S = cfg.data.seq_len
    tokens = cfg.train.micro_batch_size * S / (dims.cp * dims.tp)
    qk, v = attention_widths(model)
    total = moe_part = 0.0
    stage = dims.dense_coord(rank).pp
    for _, layers, first, last in stage_modules(model, dims, cfg.parallel.pp_layers, stage):
        for layer in layers:
            p = layer_params(model, layer)
            dense = p["attention"] + p["dense_mlp"]
            moe_flops = 0.0
            if layer >= moe.first_dense_layers:
                active = p["routed_experts"] * top_k / moe.num_experts
                moe_flops = 2 * (active + p["shared_experts"] + p["router"]) * tokens
            attention = 2 * S * model.n_heads * (qk + v) / 2 * tokens  # causal: half the scores
            total += 2 * dense * tokens + attention + moe_flops
            moe_part += moe_flops
        if last:
            total += 2 * model.vocab_size * model.d_model * tokens
    return total, moe_part


def stage_time(cfg: Any, dims: ParallelDims, gpu: Hardware, rank: int,
               top_k: Optional[int] = None, calls: Optional[list[Collective]] = None) -> StageTime:
    """One optimizer step's compute and communication on `rank` (module docstring)."""
    k = cfg.model.moe.top_k if top_k is None else top_k
    m = micro_batches(cfg, dims)
    fwd, moe_fwd = rank_forward_flops(cfg, dims, rank, k)
    recompute = getattr(cfg.train, "recompute", "none")
    extra = fwd if recompute == "full" else moe_fwd if recompute == "moe" else 0.0
    compute = m * (3 * fwd + extra) / (gpu.peak_flops * MATMUL_EFFICIENCY)
    calls = step_collectives(cfg, dims, rank) if calls is None else calls
    exposed = fsdp = 0.0
    by_what: dict[str, float] = {}
    for c in calls:
        t = collective_seconds(c, gpu, rank) * c.count
        if c.what in ("fsdp", "replicated grads"):  # FSDP2's own streams
            fsdp += t
        else:
            exposed += t
            by_what[c.what] = by_what.get(c.what, 0.0) + t
    return StageTime(dims.dense_coord(rank).pp, rank, compute, exposed, fsdp, by_what)


def optimizer_traffic_bytes(memory: list[Any]) -> float:
    """HBM bytes the optimizer pass (update + gradient norm) moves on the busiest rank, from
    `planning.memory_per_rank`'s stages: PARAM_PASS_BYTES per parameter held + the optimizer
    state read and written."""
    return max(PARAM_PASS_BYTES * (s.dense_params + s.expert_params) + 2 * s.optimizer
               for s in memory)


def estimate_step(cfg: Any, dims: ParallelDims, gpu: Hardware, top_k: Optional[int] = None,
                  memory: Optional[list[Any]] = None) -> StepEstimate:
    """The step-time model for `cfg` on `dims` and `gpu` (module docstring). `memory`: the
    stages' `planning.memory_per_rank` (computed when not given)."""
    from moetrain.planning import memory_per_rank

    model = cfg.model
    k = model.moe.top_k if top_k is None else top_k
    m = micro_batches(cfg, dims)
    stages = [stage_time(cfg, dims, gpu, stage_first_rank(dims, s), k) for s in range(dims.pp)]
    slowest = max(s.total_s for s in stages)
    bubble_slots = 0.0
    if dims.pp > 1:
        bubble_slots = (dims.pp - 1) / dims.vpp
        if cfg.parallel.pp_schedule == "zero_bubble":
            bubble_slots /= 3
    bubble = slowest * bubble_slots / m
    if memory is None:
        memory = memory_per_rank(cfg, dims, k)
    optimizer = optimizer_traffic_bytes(memory) / (gpu.hbm_tb_s * 1e12)
    step = slowest + bubble + optimizer
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    per_gpu = tokens / step / dims.world_size
    train_flops = flops_per_token(model, cfg.data.seq_len, k).train
    tflops = per_gpu * train_flops / 1e12
    return StepEstimate(step, per_gpu, tflops, tflops * 1e12 / gpu.peak_flops, bubble, optimizer,
                        stages, gpu)


__all__ = ["LATENCY_S", "LINK_EFFICIENCY", "MATMUL_EFFICIENCY", "StageTime", "StepEstimate",
           "collective_seconds", "estimate_step", "optimizer_traffic_bytes", "nodes_spanned", "rank_forward_flops",
           "stage_time"]
