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
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from moetrain.model.moe.losses import STEP, counts_unit
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.checks import fsdp_reshards_after_forward
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
    for v, layers, first, last in stages:
        if dims.tp > 1:
            seq_bytes = tokens_seq * d
            n_attn = len(layers)
            mla = getattr(model, "attention", "gqa") == "mla"
            n_mlp = sum(1 for i in layers if i < moe.first_dense_layers)
            # forward input all-gathers (norm outputs, fp32) and their backward reduce-scatters;
            # MLA's backward sums the replicated input's gradient with an all-reduce instead
            redo = n_attn + n_mlp if recompute == "full" else 0
            add("all_gather", "tp", seq_bytes * res, m * (n_attn + n_mlp + redo), "tp input")
            add("reduce_scatter", "tp", seq_bytes * res,
                m * (n_mlp + (0 if mla else n_attn)), "tp input grad")
            if mla:
                add("all_reduce", "tp", seq_bytes * res, m * n_attn, "tp input grad")
                add("all_reduce", "tp", tokens_seq * model.mla.kv_lora_rank * act, m * n_attn,
                    "tp mla latent grad")
                if model.mla.q_lora_rank is not None:
                    add("all_reduce", "tp", tokens_seq * model.mla.q_lora_rank * act,
                        m * n_attn, "tp mla latent grad")
            # output projections (wo, w2): reduce-scatter forward, all-gather of the gradient. A
            # recomputed block stops after its last saved tensor (torch.utils.checkpoint's early
            # stop): a dense block's w2 reduce-scatter is not repeated
            add("reduce_scatter", "tp", seq_bytes * act,
                m * (n_attn + n_mlp + (n_attn if recompute == "full" else 0)), "tp output")
            add("all_gather", "tp", seq_bytes * act, m * (n_attn + n_mlp), "tp output grad")
            if first:  # vocab-parallel embedding: its partial output reduce-scattered (fp32)
                add("reduce_scatter", "tp", seq_bytes * res, m, "tp embedding")
                add("all_gather", "tp", seq_bytes * res, m, "tp embedding grad")
            if last:  # the output head's input gathered, its gradient reduce-scattered
                add("all_gather", "tp", seq_bytes * res, m, "tp output head")
                add("reduce_scatter", "tp", seq_bytes * res, m, "tp output head grad")
        if dims.cp > 1:
            _context_parallel(cfg, dims, layers, m, tokens_seq, act, recompute, add)
        _expert_parallel(cfg, dims, layers, m, tokens_sp, act, res, recompute, add)
        if dims.pp > 1:
            boundary = mb * (S // dims.cp // dims.tp) * d * PARAM_BYTES
            if not first:  # activations in, their gradient back
                add("recv", "pp", boundary, m, "pp activation")
                add("send", "pp", boundary, m, "pp activation grad")
            if not last:
                add("send", "pp", boundary, m, "pp activation")
                add("recv", "pp", boundary, m, "pp activation grad")
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


def _context_parallel(cfg, dims, layers, m, tokens_seq, act, recompute, add) -> None:
    model = cfg.model
    if getattr(model, "attention", "gqa") == "mla":
        heads = model.n_heads // dims.tp
        width = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim + model.mla.v_head_dim
    else:
        from moetrain.config.schema import head_dim_of

        heads, width = model.n_kv_heads // dims.tp, 2 * head_dim_of(model)
    kv = cfg.data.seq_len // dims.cp * cfg.train.micro_batch_size * heads * width  # one rank's
    n = len(layers) * m
    redo = len(layers) * m if recompute == "full" else 0
    if cfg.parallel.cp_comm == "ring":  # (cp-1) K/V hops forward; backward K/V and fp32 dK/dV
        hops = dims.cp - 1
        add("send", "cp", kv * act, (n + redo) * hops + n * hops, "cp ring kv")
        add("recv", "cp", kv * act, (n + redo) * hops + n * hops, "cp ring kv")
        add("send", "cp", kv * 4, n * dims.cp, "cp ring dkv")
        add("recv", "cp", kv * 4, n * dims.cp, "cp ring dkv")
        return
    add("all_gather", "cp", kv * dims.cp * act, n + redo, "cp kv")
    add("reduce_scatter", "cp", kv * dims.cp * act, n, "cp kv grad")


def _expert_parallel(cfg, dims, layers, m, tokens, act, res, recompute, add) -> None:
    """The expert-parallel exchanges of one MoE layer and micro-batch (expert_parallel.py):
    forward the counts (all-to-all over ep; all-gather over etp), the rows to the experts
    (all-to-all over ep, then over etp to every ETP rank) and back; backward the reverse."""
    moe = cfg.model.moe
    if dims.ep * dims.etp == 1:
        return
    n_moe = sum(1 for i in layers if i >= moe.first_dense_layers)
    if n_moe == 0:
        return
    E, k, d = moe.num_experts, moe.top_k, cfg.model.d_model
    rows = tokens * k  # balanced expectation (exact for dropless dispatch sends)
    if moe.capacity_factor is not None and moe.pad_to_capacity:
        rows = E * math.ceil(moe.capacity_factor * tokens * k / E)
    fwd = m * n_moe * (2 if recompute in ("full", "moe") else 1)  # a recompute repeats forward
    bwd = m * n_moe
    add("all_to_all", "ep", E * 8, fwd, "ep counts")
    add("all_to_all", "ep", rows * d * res, fwd, "ep dispatch")
    add("all_to_all", "ep", rows * d * act, fwd, "ep combine")
    add("all_to_all", "ep", rows * d * act, bwd, "ep combine grad")
    add("all_to_all", "ep", rows * d * res, bwd, "ep dispatch grad")
    if dims.etp > 1:
        etp = dims.etp
        add("all_gather", "etp", E * 8 * etp, fwd, "etp counts")
        add("all_to_all", "etp", etp * rows * d * res, fwd, "etp gather")
        add("all_to_all", "etp", etp * rows * d * act, fwd, "etp scatter")
        add("all_to_all", "etp", etp * rows * d * act, bwd, "etp scatter grad")
        add("all_to_all", "etp", etp * rows * d * res, bwd, "etp gather grad")


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


__all__ = ["Collective", "autocast_bf16", "by_op_and_group", "micro_batches", "rank_comm_bytes",
           "step_collectives"]
