"""Every collective one training step issues on a rank: kind, group, bytes, how many times.

    calls = step_collectives(cfg, dims, rank)     # list[Collective]
    totals = by_op_and_group(calls)               # {(op, group ranks): (calls, bytes)}

Counted from the code's own plan, not measured: the parameter shards and FSDP units of
`plan_shards`, the micro-batches of the step, and the collectives each piece of moetrain issues
per micro-batch or per step (docs/planning.md, "Communication", lists them with the code that
issues them). `tests/distributed/test_plan_collectives.py` runs real steps on gloo ranks under
`moetrain.parallel.comm_record.CollectiveRecorder` and checks that the calls and bytes are these.

Bytes of one call, as the recorder reads them: the output of an all-gather, the input of a
reduce-scatter, an all-reduce's buffer, an all-to-all's send buffer, a send's or a recv's
message. The rows an expert-parallel all-to-all moves depend on the routing: the planner counts
the balanced expectation (each rank's tokens x k rows each way), which is exact for the rows a
rank sends in the dispatch and gets back in the combine and, summed over the group, for every
other exchange.

Dtypes: parameters and their gradients are fp32 (moetrain keeps fp32 weights and computes under
autocast), so are the residual stream and the norm outputs (what the attention, the dense MLP,
the MoE dispatch and the pipeline boundaries move); the outputs of matrix multiplies (the
attention / MLP output projections, the experts, keys and values) are bf16 under bf16 autocast.
A multi-token-prediction block's residual stream starts at eh_proj's output (a matmul's), so
everything its attention, MLP and MoE layer move is in the matmul dtype.

Where torch issues a different collective on GPUs than on CPU (DTensor's shard-to-shard
redistribution: an all-to-all with NCCL, an all-gather and a chunk with gloo) the count follows
`train.device`: cpu counts what gloo issues, cuda / auto what NCCL does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from moetrain.model.moe.losses import STEP, counts_unit
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.checks import fsdp_reshards_after_forward
from moetrain.parallel.pipeline.stages import last_stage_embeds
from moetrain.plan_shards import Unit, rank_units, stage_modules
from moetrain.step_fields import field_width, step_fields

PARAM_BYTES = 4  # fp32 parameters and gradients


@dataclass(frozen=True)
class Collective:
    """`count` calls of one collective per optimizer step on a rank."""

    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | send | recv
    group: str  # the group kind (a ParallelDims.GROUP_KINDS name, or "world")
    ranks: tuple[int, ...]  # the rank's group of that kind
    bytes: int  # bytes of one call (module docstring)
    count: int  # calls per step
    what: str  # who issues it, e.g. "fsdp", "tp", "ep dispatch"

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count


def autocast_bf16(cfg: Any) -> bool:
    """Whether a run of `cfg` computes under bf16 autocast (train.dtype, auto = bf16 off CPU)."""
    t = cfg.train
    return t.dtype == "bf16" or (t.dtype == "auto" and t.device != "cpu")


def micro_batches(cfg: Any, dims: ParallelDims) -> int:
    """Micro-batches per data-parallel rank and optimizer step."""
    t = cfg.train
    return max(1, t.global_batch_size // (t.micro_batch_size * dims.dp))


def fsdp_all_gathers(unit: Unit, dims: ParallelDims, m: int, reshard_after_forward: bool) -> int:
    """All-gathers of one FSDP unit per step. Without PP each micro-batch gathers every unit
    for its forward and, resharded after it, again for its backward (a stage root once, it is
    not resharded after forward but after backward). Under PP torch's stages keep the units
    gathered after each backward but the last (`set_reshard_after_backward(False)`), so a unit
    is gathered for a forward that follows a forward and a backward that follows a forward:
    m + 1 times under 1F1B and GPipe, a root once. The interleaved order is counted with the
    same rule per virtual stage (an estimate: the dry run reads the real order). Units not
    resharded after forward (`parallel.fsdp.reshard_after_forward=false`, and always under
    zero bubble: `checks.fsdp_reshards_after_forward`) gather as a root does."""
    root = unit.root or not reshard_after_forward
    if dims.pp == 1:
        return m if root else 2 * m
    return 1 if root else m + 1


def mtp_depth(model: Any) -> int:
    """model.mtp.depth (0 without multi-token prediction)."""
    return getattr(getattr(model, "mtp", None), "depth", 0) or 0


def step_collectives(cfg: Any, dims: ParallelDims, rank: int) -> list[Collective]:
    """Every collective one optimizer step issues on `rank` (module docstring)."""
    model, par, train, moe = cfg.model, cfg.parallel, cfg.train, cfg.model.moe
    m = micro_batches(cfg, dims)
    mb, S = train.micro_batch_size, cfg.data.seq_len
    act = 2 if autocast_bf16(cfg) else 4  # matmul outputs
    res = 4  # residual stream, norm outputs
    d = model.d_model
    recompute = getattr(train, "recompute", "none")
    groups = {k: tuple(dims.group_of(k, rank)) for k in
              ("tp", "cp", "pp", "dp_cp", "cp_tp", "dp_cp_tp", "ep", "etp", "edp")}
    groups["world"] = tuple(range(dims.world_size))
    # the first and the last stage's ranks of this pp group (moetrain/parallel/parallelize.py
    # `_shared_embedding`; Megatron's "embedding group")
    groups["embedding"] = (groups["pp"][0], groups["pp"][-1])
    out: list[Collective] = []

    def add(op, group, nbytes, count, what):
        if count > 0:
            out.append(Collective(op, group, groups[group], int(nbytes), int(count), what))

    units = rank_units(cfg, dims, rank)
    _data_parallel(cfg, dims, units, m, add)

    pp_rank = dims.dense_coord(rank).pp
    stages = stage_modules(model, dims, par.pp_layers, pp_rank)
    tokens_seq = mb * S // dims.cp  # tokens of this rank's sequence chunk
    tokens_sp = tokens_seq // dims.tp  # after sequence parallelism
    mtp = mtp_depth(model)
    for v, layers, first, last in stages:
        n_mtp = mtp if last else 0  # the MTP modules sit on the last stage
        n_dense = sum(1 for i in layers if i < moe.first_dense_layers)
        n_mtp_dense = n_mtp if n_mtp and model.mtp.block == "dense" else 0
        if dims.tp > 1:
            seq_bytes = tokens_seq * d
            _tensor_parallel_blocks(cfg, m, tokens_seq, len(layers), n_dense, res, act,
                                    recompute, add, "")
            if first:  # vocab-parallel embedding: its partial output reduce-scattered (fp32)
                add("reduce_scatter", "tp", seq_bytes * res, m, "tp embedding")
                add("all_gather", "tp", seq_bytes * res, m, "tp embedding grad")
            if last:  # the output head's input gathered, its gradient reduce-scattered
                add("all_gather", "tp", seq_bytes * res, m, "tp output head")
                add("reduce_scatter", "tp", seq_bytes * res, m, "tp output head grad")
            if n_mtp:
                _tensor_parallel_mtp(cfg, dims.tp, m, tokens_seq, n_mtp, n_mtp_dense, res, act,
                                     recompute, add)
        if dims.cp > 1:
            _context_parallel(cfg, dims, len(layers) + n_mtp, m, tokens_seq, act, recompute,
                              add)
        n_moe = len(layers) - n_dense
        # MoE layers move the residual stream: fp32 in the main model, the matmul dtype in an
        # MTP block (its input is eh_proj's output)
        _expert_parallel(cfg, dims, n_moe, m, tokens_sp, act, res, recompute, add, "")
        _expert_parallel(cfg, dims, n_mtp - n_mtp_dense, m, tokens_sp, act, act, recompute,
                         add, "mtp ")
        if dims.pp > 1:
            boundary = mb * (S // dims.cp // dims.tp) * d * PARAM_BYTES
            if not first:  # activations in, their gradient back
                add("recv", "pp", boundary, m, "pp activation")
                add("send", "pp", boundary, m, "pp activation grad")
            if not last:
                add("send", "pp", boundary, m, "pp activation")
                add("recv", "pp", boundary, m, "pp activation grad")
    if dims.pp > 1 and last_stage_embeds(model):
        # PipelineStepRunner._sum_shared_grad: the embedding the first and the last stage both
        # hold (MTP, a tied head) has its gradient - this rank's local shard, after FSDP's
        # reduce-scatter - summed over the pair once per step
        held = next((p.held for u in units for name, p in zip(u.names(), u.params)
                     if name == "tok_embeddings.weight"), None)  # None: a middle stage
        if held is not None:
            add("all_reduce", "embedding", held * PARAM_BYTES, 1, "pp shared embedding grad")
    if dims.tp > 1:  # Replicate-over-TP weights: their partial gradients summed once per step
        for u in units:
            for p in u.params:
                if p.spec.tp_replicated and not p.spec.name.endswith(("wq_a.weight",
                                                                        "wkv_a.weight")):
                    add("all_reduce", "tp", p.unsharded * PARAM_BYTES, 1, "tp replicated grad")
    # load-balancing counts of every MoE layer and micro-batch over the scope's ranks
    # (the ranks holding the other tokens of the scope's unit, as parallelize wires them)
    kind = "dp_cp_tp" if counts_unit(moe.lbl.scope) == STEP else "cp_tp"
    if dims.size(kind) > 1:
        slots = moe.num_experts + moe.routing.num_null_experts
        shape = slots * (mb if moe.lbl.scope == "seq" else 1)
        n_moe = sum(1 for _, layers, _, _ in stages for i in layers if i >= moe.first_dense_layers)
        # (an MTP block's MoE layer takes part in load balancing like the main model's)
        n_moe += sum(mtp for _, _, _, last in stages if last and mtp and model.mtp.block == "moe")
        add("all_reduce", kind, shape * 8, m * n_moe, "lbl counts")
    if dims.world_size > 1:
        add("all_reduce", "world", field_width(step_fields(cfg, dims.world_size)) * 8, 1,
            "step sums")
    return out


def _data_parallel(cfg, dims, units: list[Unit], m: int, add) -> None:
    par = cfg.parallel
    if par.fsdp.enabled:
        for u in units:
            if u.size > 1 and u.params:
                nbytes = u.gathered * PARAM_BYTES
                add("all_gather", u.group, nbytes,
                    fsdp_all_gathers(u, dims, m, fsdp_reshards_after_forward(par)), "fsdp")
                add("reduce_scatter", u.group, nbytes, 1, "fsdp")
        return
    # Replicated (FSDP2's replicate dimension, shard size 1): no all-gather, no reduce-scatter;
    # each unit's whole gradient all-reduced once per step over its group - a one-rank group
    # included (FSDP2 issues it; no bytes move)
    for u in units:
        if u.params:
            add("all_reduce", u.group, u.unsharded * PARAM_BYTES, 1, "replicated grads")


def _tensor_parallel_blocks(cfg, m, tokens_seq, n_attn, n_mlp, resid, act, recompute, add,
                            label) -> None:
    """TP + SP collectives of `n_attn` transformer blocks per micro-batch, `n_mlp` of them with
    a dense MLP (apply_tensor_parallel's `_block_plan`; an MoE layer runs on the rank's own
    positions, no TP collective). `resid`: bytes of an element of the blocks' residual stream
    and norm outputs (fp32 in the main model; an MTP block's input is eh_proj's output, in the
    matmul dtype)."""
    model = cfg.model
    seq_bytes = tokens_seq * model.d_model
    mla = getattr(model, "attention", "gqa") == "mla"
    # forward input all-gathers (norm outputs) and their backward reduce-scatters; MLA's
    # backward sums the replicated input's gradient with an all-reduce instead
    redo = n_attn + n_mlp if recompute == "full" else 0
    add("all_gather", "tp", seq_bytes * resid, m * (n_attn + n_mlp + redo), label + "tp input")
    add("reduce_scatter", "tp", seq_bytes * resid, m * (n_mlp + (0 if mla else n_attn)),
        label + "tp input grad")
    if mla:
        add("all_reduce", "tp", seq_bytes * resid, m * n_attn, label + "tp input grad")
        add("all_reduce", "tp", tokens_seq * model.mla.kv_lora_rank * act, m * n_attn,
            label + "tp mla latent grad")
        if model.mla.q_lora_rank is not None:
            add("all_reduce", "tp", tokens_seq * model.mla.q_lora_rank * act, m * n_attn,
                label + "tp mla latent grad")
    # output projections (wo, w2): reduce-scatter forward, all-gather of the gradient. A
    # recomputed block stops after its last saved tensor (torch.utils.checkpoint's early
    # stop): a dense block's w2 reduce-scatter is not repeated
    add("reduce_scatter", "tp", seq_bytes * act,
        m * (n_attn + n_mlp + (n_attn if recompute == "full" else 0)), label + "tp output")
    add("all_gather", "tp", seq_bytes * act, m * (n_attn + n_mlp), label + "tp output grad")


def _tensor_parallel_mtp(cfg, tp, m, tokens_seq, depth, n_dense, res, act, recompute, add,
                        ) -> None:
    """TP + SP collectives of `depth` MTP modules per micro-batch (moetrain/model/mtp.py;
    apply_tensor_parallel's MTP plan): the embedding of the tokens k ahead (the shared
    vocab-parallel embedding: fp32 reduce-scatter, all-gather of its gradient); eh_proj
    (colwise on the whole sequence: its input [B, S, 2d], fp32 - the concatenation promotes -
    all-gathered, its gradient reduce-scattered; its output, in the matmul dtype, from feature
    shards back to sequence shards and its gradient the other way); the block (`n_dense` with
    a dense MLP) on the matmul dtype's residual stream; the shared output head's input
    (RMSNorm(h^k), the matmul dtype) all-gathered, its gradient reduce-scattered."""
    seq_bytes = tokens_seq * cfg.model.d_model
    n = m * depth
    add("reduce_scatter", "tp", seq_bytes * res, n, "mtp tp embedding")
    add("all_gather", "tp", seq_bytes * res, n, "mtp tp embedding grad")
    add("all_gather", "tp", 2 * seq_bytes * res, n, "mtp tp eh_proj input")
    add("reduce_scatter", "tp", 2 * seq_bytes * res, n, "mtp tp eh_proj input grad")
    # DTensor's Shard(-1) <-> Shard(1) (`shard_dim_alltoall`): an all-to-all of the rank's
    # [B, S, d/tp] shard on GPUs; gloo has no all-to-all there, so on CPU an all-gather of the
    # whole [B, S, d] and a chunk
    if cfg.train.device == "cpu":
        add("all_gather", "tp", seq_bytes * act, 2 * n, "mtp tp eh_proj output")
    else:
        add("all_to_all", "tp", seq_bytes * act // tp, 2 * n, "mtp tp eh_proj output")
    _tensor_parallel_blocks(cfg, m, tokens_seq, depth, n_dense, act, act, recompute, add, "mtp ")
    add("all_gather", "tp", seq_bytes * act, n, "mtp tp output head")
    add("reduce_scatter", "tp", seq_bytes * act, n, "mtp tp output head grad")


def _context_parallel(cfg, dims, n_layers, m, tokens_seq, act, recompute, add) -> None:
    """K/V exchanges of `n_layers` attention layers (an MTP block's included) per micro-batch
    (context_parallel.py)."""
    model = cfg.model
    if getattr(model, "attention", "gqa") == "mla":
        heads = model.n_heads // dims.tp
        width = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim + model.mla.v_head_dim
    else:
        from moetrain.config.schema import head_dim_of

        heads, width = model.n_kv_heads // dims.tp, 2 * head_dim_of(model)
    kv = cfg.data.seq_len // dims.cp * cfg.train.micro_batch_size * heads * width  # one rank's
    n = n_layers * m
    redo = n_layers * m if recompute == "full" else 0
    if cfg.parallel.cp_comm == "ring":  # (cp-1) K/V hops forward; backward K/V and fp32 dK/dV
        hops = dims.cp - 1
        add("send", "cp", kv * act, (n + redo) * hops + n * hops, "cp ring kv")
        add("recv", "cp", kv * act, (n + redo) * hops + n * hops, "cp ring kv")
        add("send", "cp", kv * 4, n * dims.cp, "cp ring dkv")
        add("recv", "cp", kv * 4, n * dims.cp, "cp ring dkv")
        return
    add("all_gather", "cp", kv * dims.cp * act, n + redo, "cp kv")
    add("reduce_scatter", "cp", kv * dims.cp * act, n, "cp kv grad")


def _expert_parallel(cfg, dims, n_moe, m, tokens, act, resid, recompute, add, label) -> None:
    """The expert-parallel exchanges of `n_moe` MoE layers per micro-batch (expert_parallel.py):
    forward the counts (all-to-all over ep; all-gather over etp), the rows to the experts
    (all-to-all over ep, then over etp to every ETP rank; `resid` bytes an element: the
    residual stream's dtype) and back (the experts' output, `act`); backward the reverse."""
    moe = cfg.model.moe
    if dims.ep * dims.etp == 1 or n_moe == 0:
        return
    E, k, d = moe.num_experts, moe.top_k, cfg.model.d_model
    rows = tokens * k  # balanced expectation (exact for dropless dispatch sends)
    if moe.capacity_factor is not None and moe.pad_to_capacity:
        rows = E * math.ceil(moe.capacity_factor * tokens * k / E)
    fwd = m * n_moe * (2 if recompute in ("full", "moe") else 1)  # a recompute repeats forward
    bwd = m * n_moe
    add("all_to_all", "ep", E * 8, fwd, label + "ep counts")
    add("all_to_all", "ep", rows * d * resid, fwd, label + "ep dispatch")
    add("all_to_all", "ep", rows * d * act, fwd, label + "ep combine")
    add("all_to_all", "ep", rows * d * act, bwd, label + "ep combine grad")
    add("all_to_all", "ep", rows * d * resid, bwd, label + "ep dispatch grad")
    if dims.etp > 1:
        etp = dims.etp
        add("all_gather", "etp", E * 8 * etp, fwd, label + "etp counts")
        add("all_to_all", "etp", etp * rows * d * resid, fwd, label + "etp gather")
        add("all_to_all", "etp", etp * rows * d * act, fwd, label + "etp scatter")
        add("all_to_all", "etp", etp * rows * d * act, bwd, label + "etp scatter grad")
        add("all_to_all", "etp", etp * rows * d * resid, bwd, label + "etp gather grad")


def by_op_and_group(calls: list[Collective]) -> dict[tuple[str, tuple[int, ...]], tuple[int, int]]:
    """{(op, group ranks): (calls, bytes)} summed over `calls`."""
    out: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(lambda: [0, 0])
    for c in calls:
        agg = out[(c.op, c.ranks)]
        agg[0] += c.count
        agg[1] += c.total_bytes
    return {key: (n, b) for key, (n, b) in out.items()}


def rank_comm_bytes(calls: list[Collective]) -> dict[str, int]:
    """Bytes per step by group kind (the planner's communication table)."""
    out: dict[str, int] = defaultdict(int)
    for c in calls:
        out[c.group] += c.total_bytes
    return dict(out)


__all__ = ["Collective", "autocast_bf16", "by_op_and_group", "micro_batches", "mtp_depth",
           "rank_comm_bytes", "step_collectives"]
