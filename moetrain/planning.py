"""Sizing a config before running it: parameters, FLOPs per token, sparsity, memory per rank.

Pure arithmetic over the config (no model is built), shared by `python -m moetrain.plan` and
tests. The definitions are in docs/planning.md: parameters exactly as `moetrain.model.Transformer`
builds them, active parameters (k of E routed experts), training FLOPs per token in the
PaLM / Megatron convention, activation ratio, granularity, and the memory model of
`memory_per_rank`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from moetrain.config.schema import head_dim_of
from moetrain.model.init import TEMP_BYTES_PER_ELEMENT, chunk_elements
from moetrain.optim import ADAMW_STATE_BYTES, state_bytes_per_element
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.checks import fsdp_reshards_after_forward

#: Bytes per parameter, as moetrain allocates them on every device: fp32 weights (bf16 runs
#: autocast, which casts them per op; there is no separate bf16 copy), fp32 gradients, AdamW's
#: fp32 exp_avg and exp_avg_sq. 16 in all (Megatron's bf16-weights-plus-fp32-master is 18).
WEIGHT_BYTES = 4
GRAD_BYTES = 4
OPTIM_BYTES = ADAMW_STATE_BYTES  # AdamW's; per tensor and optimizer: optimizer_state_bytes
ACT_BYTES = 2  # bf16 activations


def optimizer_state_bytes(optim: Any, spec: Any) -> int:
    """Bytes of optimizer state per element of one parameter tensor, by optimizer kind.

    `optim`: the config's `optim` section (its `name`, "adamw" when it has none); `spec`: the
    tensor (`plan_shards.ParamSpec`: model name, global shape, component, kind). The one place
    the planner learns an optimizer's state: the memory per rank, the dry run's check and the
    step-time model's optimizer pass (`step_time.optimizer_traffic_bytes`) all read it. The
    answer is moetrain.optim's (`state_bytes_per_element`, by the rules that route each
    parameter): AdamW's fp32 exp_avg and exp_avg_sq, 8 B; under optim.name=muon, 4 B (one
    momentum buffer) for the hidden matrices Muon takes and 8 B for the rest. Raises ValueError
    for an optimizer moetrain does not build.
    """
    # A block's spec is named by its template ("layers.{layer}.…", shared by every block of a
    # kind); the routing rules match any layer number.
    return state_bytes_per_element(str(getattr(optim, "name", "adamw")),
                                   spec.name.format(layer=0))


COMPONENTS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router",
              "norms", "output", "mtp")


@dataclass
class ParamCounts:
    """Parameters by component; `total` and `active` (k of E routed experts) per component."""

    total: dict[str, int]
    active: dict[str, int]

    @property
    def n_total(self) -> int:
        return sum(self.total.values())

    @property
    def n_active(self) -> int:
        return sum(self.active.values())

    # Multi-token prediction: active parameters of its modules that take part in a matmul, and
    # how many more times each token goes through the shared output head (its depth D).
    mtp_matmul: int = 0
    mtp_heads: int = 0

    @property
    def n_main(self) -> int:
        """Parameters of the main model (without the multi-token-prediction modules)."""
        return self.n_total - self.total["mtp"]

    @property
    def n_active_matmul(self) -> int:
        """Active parameters applied to each token in a matrix multiply (N_mm of the FLOPs
        formula): the main model's, and the MTP modules' with the shared output head once per
        depth (its parameters are counted once, its multiply D + 1 times)."""
        a = self.active
        output = a["output"] or a["embedding"]  # tied: the embedding matrix is the output matmul
        return a["attention"] + a["dense_mlp"] + a["routed_experts"] + a["shared_experts"] + \
            a["router"] + output * (1 + self.mtp_heads) + self.mtp_matmul


def layer_params(model: Any, layer: int) -> dict[str, int]:
    """Parameters of transformer block `layer` by component (all routed experts)."""
    return block_params(model, dense=layer < model.moe.first_dense_layers)


def block_params(model: Any, dense: bool) -> dict[str, int]:
    """Parameters of one transformer block by component (all routed experts): dense MLP or MoE."""
    d, moe = model.d_model, model.moe
    out = dict.fromkeys(COMPONENTS, 0)
    out["attention"] = attention_params(model)
    out["norms"] = 2 * d
    if dense:
        out["dense_mlp"] = 3 * d * model.ffn_hidden
    else:
        out["routed_experts"] = 3 * d * moe.expert_hidden * moe.num_experts
        out["shared_experts"] = 3 * d * shared_hidden(model)
        if moe.shared_expert_gate and moe.num_shared_experts:
            out["shared_experts"] += d
        out["router"] = moe.num_experts * d
    return out


def attention_params(model: Any) -> int:
    """Parameters of one attention block (module docstring), q/k and latent norms included."""
    d, H = model.d_model, model.n_heads
    if getattr(model, "attention", "gqa") == "mla":
        m = model.mla
        q_h = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = d * H * q_h if m.q_lora_rank is None else (
            d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * q_h)
        kv = (d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
              + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim))
        return q + kv + H * m.v_head_dim * d
    h = head_dim_of(model)
    n = d * (H + 2 * model.n_kv_heads) * h + H * h * d
    qk_norm = getattr(model, "qk_norm", "none")
    if qk_norm == "head":
        n += 2 * h
    elif qk_norm == "full":
        n += (H + model.n_kv_heads) * h
    return n


def attention_widths(model: Any) -> tuple[int, int]:
    """(query/key width, value width) of one head: both head_dim for GQA."""
    if getattr(model, "attention", "gqa") == "mla":
        m = model.mla
        return m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    h = head_dim_of(model)
    return h, h


def shared_hidden(model: Any) -> int:
    """Total width of the shared experts (n_s experts of width F_s act as one SwiGLU of n_s F_s)."""
    moe = model.moe
    return moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)


def mtp_module_params(model: Any, top_k: Optional[int] = None) -> dict[str, int]:
    """Parameters of one multi-token-prediction module by component (moetrain/model/mtp.py):
    its block, its RMSNorms of the embedding, the hidden state and the output (3 d) and its
    projection [2d -> d]; {"active": ...} counts k of E routed experts. The embedding and the
    output head are the main model's (shared, not counted)."""
    mtp, moe, d = model.mtp, model.moe, model.d_model
    parts = block_params(model, dense=mtp.block == "dense")
    parts["norms"] += 3 * d
    total = sum(parts.values()) + 2 * d * d
    k = moe.top_k if top_k is None else top_k
    routed_active = 0 if mtp.block == "dense" else k * 3 * d * moe.expert_hidden
    matmul = total - parts["norms"] - parts["routed_experts"] + routed_active
    return {"total": total, "active": total - parts["routed_experts"] + routed_active,
            "matmul": matmul}


def count_parameters(model: Any, top_k: Optional[int] = None) -> ParamCounts:
    """Total and active parameters of a `ModelConfig`; `top_k` overrides model.moe.top_k.
    Component "mtp": the multi-token-prediction modules (model.mtp.depth of them)."""
    moe = model.moe
    k = moe.top_k if top_k is None else top_k
    total = dict.fromkeys(COMPONENTS, 0)
    for layer in range(model.n_layers):
        for name, n in layer_params(model, layer).items():
            total[name] += n
    total["embedding"] = model.vocab_size * model.d_model
    total["norms"] += model.d_model
    total["output"] = 0 if model.tie_embeddings else model.vocab_size * model.d_model
    active = dict(total)
    # Exact integer: every routed expert has 3 d F_e parameters.
    moe_layers = model.n_layers - moe.first_dense_layers
    active["routed_experts"] = moe_layers * k * 3 * model.d_model * moe.expert_hidden
    depth = model.mtp.depth
    module = mtp_module_params(model, k)
    total["mtp"], active["mtp"] = depth * module["total"], depth * module["active"]
    return ParamCounts(total, active, mtp_matmul=depth * module["matmul"], mtp_heads=depth)


@dataclass
class Flops:
    """FLOPs per token: forward matmuls (2 N_mm), attention scores/values, fwd+bwd = 3x."""

    matmul_forward: float
    attention_forward: float

    @property
    def forward(self) -> float:
        return self.matmul_forward + self.attention_forward

    @property
    def train(self) -> float:
        return 3.0 * self.forward


def flops_per_token(model: Any, seq_len: int, top_k: Optional[int] = None,
                    causal: bool = False) -> Flops:
    """Training FLOPs per token of a `ModelConfig` at sequence length `seq_len` (module docstring)."""
    n_mm = count_parameters(model, top_k).n_active_matmul
    qk, v = attention_widths(model)
    # every block attends: the main model's layers and the MTP modules' blocks
    attention = 2.0 * (model.n_layers + model.mtp.depth) * seq_len * model.n_heads * (qk + v)
    return Flops(2.0 * n_mm, attention / 2 if causal else attention)


def granularity(model: Any) -> float:
    """G = model.ffn_hidden / model.moe.expert_hidden (module docstring)."""
    return model.ffn_hidden / model.moe.expert_hidden


# -- memory -------------------------------------------------------------------------------------


def in_flight_micro_batches(stage: int, dims: ParallelDims, n_micro: int, schedule: str) -> float:
    """Micro-batches whose activations a stage holds at its peak.

    No PP: 1 (gradient accumulation frees each before the next). GPipe: all of them. 1F1B and
    zero-bubble: stage s warms up with pp - s forwards. Interleaved 1F1B: Megatron's estimate for
    the first stage, pp (1 + (pp - 1) / (pp vpp)) layers-worth, scaled for later stages.
    """
    pp = dims.pp
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(n_micro)
    warm = float(min(pp - stage, n_micro))
    if schedule == "interleaved":
        warm *= 1.0 + (pp - 1) / (pp * dims.vpp)
    return warm


def block_activation_parts(model: Any, dense: bool, tokens: float, dims: ParallelDims,
                           top_k: int) -> tuple[float, float]:
    """(kept for the attention and the FFN input, kept inside the FFN) in bytes: one rank's
    share of one block (a dense MLP or an MoE layer) for one micro-batch, bf16, no recompute
    (`layer_activation_bytes` has the terms)."""
    d, moe = model.d_model, model.moe
    qk, v = attention_widths(model)
    # MLA keeps per-head keys and values (rebuilt from the latent) like GQA with Hkv = H.
    q, kv = model.n_heads * qk, model.n_kv_heads * (qk + v) // 2
    attention = 2 * d + 2 * q + 2 * kv + 2 * model.n_heads + 2 * d
    if dense:
        ffn = 3 * model.ffn_hidden
    else:
        ffn = top_k * dims.etp * (2 * d + 3 * moe.expert_hidden / dims.etp)
        ffn += 3 * shared_hidden(model) + 2 * 2 * moe.num_experts
    scale = ACT_BYTES * tokens / dims.tp
    return attention * scale, ffn * scale


def layer_activation_parts(model: Any, layer: int, tokens: float, dims: ParallelDims,
                           top_k: int) -> tuple[float, float]:
    """`block_activation_parts` of transformer block `layer`."""
    return block_activation_parts(model, layer < model.moe.first_dense_layers, tokens, dims,
                                  top_k)


def layer_activation_bytes(model: Any, layer: int, tokens: float, dims: ParallelDims,
                           top_k: int) -> float:
    """Bytes one rank keeps for backward of block `layer` for one micro-batch (bf16, no recompute).

    `tokens` = micro_batch * seq_len / cp (the tokens of the rank's sequence chunk). Per token,
    in elements, with SP (TP > 1 splits the token dimension of norms and residuals over tp, and
    the head / hidden dimension of the rest, so every term divides by tp):
        attention:  2 d (norm in, qkv in) + 2 q (q, attention out) + 2 kv (k, v)
        ffn input:  2 d (norm in, mlp/router in)
        dense MLP:  3 F (w1 out, w3 out, their SwiGLU product = w2 in)
        MoE:        k etp (2 d + 3 F_e / etp)  (permuted input, expert output for the combine-
                    weight gradient, w1/w3 out, product; ETP gathers its group's tokens and
                    splits F_e), + 3 F_s shared, + 2 E router logits/probs in fp32 (x2 bytes)
    The attention kernel is a fused (flash) one: no S x S scores are kept, only its output and
    a per-head fp32 logsumexp (2 H elements).
    """
    return sum(layer_activation_parts(model, layer, tokens, dims, top_k))


def stage_activation_bytes(model: Any, layers: list[int], tokens: float, dims: ParallelDims,
                           top_k: int, recompute: str, in_flight: float,
                           mtp_blocks: int = 0) -> float:
    """Activation bytes of a stage at its peak under `train.recompute`:
        none   every layer's `layer_activation_bytes`, times the micro-batches in flight;
        moe    MoE layers keep their attention part and FFN input only (the MoE layer is
               recomputed from its input), + one MoE layer's inside while it is recomputed;
        full   each block keeps its input (the fp32 residual, tokens / tp x d x 4 B), + one
               whole block while it is recomputed.
    `mtp_blocks`: the multi-token-prediction modules the stage holds (the last stage): each
    one's block under the same rule (dense or MoE, `model.mtp.block`) and its two normalised
    inputs and their concatenation (4 d per token, bf16).
    """
    blocks = [layer < model.moe.first_dense_layers for layer in layers]
    blocks += [model.mtp.block == "dense"] * mtp_blocks
    kept = mtp_blocks * ACT_BYTES * 4 * model.d_model * tokens / dims.tp
    redo = 0.0
    for dense in blocks:
        attention, ffn = block_activation_parts(model, dense, tokens, dims, top_k)
        if recompute == "full":
            kept += 4 * model.d_model * tokens / dims.tp
            redo = max(redo, attention + ffn)
        elif recompute == "moe" and not dense:
            kept += attention
            redo = max(redo, ffn)
        else:
            kept += attention + ffn
    return kept * in_flight + redo


@dataclass
class StageMemory:
    """Bytes per rank of one pipeline stage (one rank's share under the layout)."""

    stage: int
    dense_params: float  # parameter elements the rank holds (after TP, PP and FSDP sharding)
    expert_params: float
    weights: float  # fp32 storage (FSDP2's padded shards)
    grads: float
    optimizer: float
    fsdp_buffers: float  # transient unsharded fp32 parameters (all-gather outputs)
    activations: float
    logits: float  # last stage: bf16 logits + fp32 softmax of one micro-batch
    # Peak while initialising (before any gradient or optimizer state exists): the weights plus
    # the generator's temporaries for one chunk (moetrain/model/init.py).
    init_peak: float = 0.0
    # FSDP with several micro-batches per step: the unsharded fp32 gradients FSDP2 keeps
    # between them (`set_requires_gradient_sync(False)` accumulates unsharded gradients).
    grad_accum: float = 0.0
    rank: int = 0  # the rank these numbers are for (the stage's first)

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.fsdp_buffers + self.grad_accum
                + self.activations + self.logits)


def stage_first_rank(dims: ParallelDims, stage: int) -> int:
    """The first rank of pipeline stage `stage` (pp is the outermost dim of both views)."""
    return stage * (dims.world_size // dims.pp)


def memory_per_rank(cfg: Any, dims: ParallelDims, top_k: Optional[int] = None) -> list[StageMemory]:
    """Memory of one rank of each pipeline stage (its first rank: with uneven shards the
    largest) for a `MoetrainConfig` under `dims`; `rank_memory` for any rank."""
    return [rank_memory(cfg, dims, stage_first_rank(dims, s), top_k) for s in range(dims.pp)]


def rank_memory(cfg: Any, dims: ParallelDims, rank: int, top_k: Optional[int] = None) -> StageMemory:
    """Memory of `rank` under `dims`, tensor by tensor (`plan_shards.rank_units`).

    Parameters, weights and gradients are the rank's shards exactly as moetrain shards them:
    dense weights split over tp (norms and MLA's latent path replicated), routed experts over
    ep x etp, layers over pp, then with FSDP every tensor's dim 0 over its unit's group (dense:
    dp_cp; router and shared experts: dp_cp_tp; experts: edp), padded to a multiple of it
    (the weights and gradients are FSDP2's padded storage, AdamW's states the unpadded shard).
    Without FSDP the data-parallel ranks are replicas.
    Bytes per parameter: WEIGHT_BYTES + GRAD_BYTES + OPTIM_BYTES (4 + 4 + 8), what the run
    allocates (a test compares them with real ranks' allocations, the dry run with the built
    model). FSDP's transient buffers: without PP the stage root (not resharded after forward)
    and the two largest other units (the current and the prefetched); under PP every unit,
    which torch's stages keep gathered after each backward but the last, and every unit when
    they are not resharded after forward (`checks.fsdp_reshards_after_forward`). With several
    micro-batches per step FSDP2 also keeps their unsharded gradients (`grad_accum`).
    """
    from moetrain.plan_shards import rank_units, stage_modules

    model, moe, par, train = cfg.model, cfg.model.moe, cfg.parallel, cfg.train
    k = moe.top_k if top_k is None else top_k
    fsdp = par.fsdp.enabled
    micro, seq = train.micro_batch_size, cfg.data.seq_len
    chunk = chunk_elements("cpu" if train.device == "cpu" else "cuda")
    n_micro = max(1, train.global_batch_size // (micro * dims.dp))
    tokens = micro * seq / dims.cp
    stage = dims.dense_coord(rank).pp
    units = rank_units(cfg, dims, rank)
    params = [p for u in units for p in u.params]
    dense = sum(p.held for p in params if p.spec.kind != "experts")
    experts = sum(p.held for p in params if p.spec.kind == "experts")
    allocated = sum(p.allocated for p in params)
    gathered = [u.gathered * WEIGHT_BYTES for u in units if fsdp and u.size > 1 and u.params]
    if not gathered:
        buffers = 0.0
    elif dims.pp > 1 or not fsdp_reshards_after_forward(par):
        buffers = float(sum(gathered))
    else:
        roots = [u.gathered * WEIGHT_BYTES for u in units if u.root and u.size > 1 and u.params]
        others = sorted((u.gathered * WEIGHT_BYTES for u in units
                         if not u.root and u.size > 1 and u.params), reverse=True)
        buffers = float(sum(roots) + sum(others[:2]))
    accumulating = fsdp and (n_micro > 1 or dims.pp > 1)
    grad_accum = float(sum(u.unsharded for u in units) * GRAD_BYTES) if accumulating else 0.0
    layers = [i for _, ids, _, _ in stage_modules(model, dims, par.pp_layers, stage) for i in ids]
    last = stage == dims.pp - 1
    depth = model.mtp.depth if last else 0  # the MTP modules sit on the last stage
    in_flight = in_flight_micro_batches(stage, dims, n_micro, par.pp_schedule)
    act = stage_activation_bytes(model, layers, tokens, dims, k,
                                 getattr(train, "recompute", "none"), in_flight, mtp_blocks=depth)
    # the last stage: the main and every MTP depth's logits
    logits = (1 + depth) * (ACT_BYTES + 4) * tokens * model.vocab_size / dims.tp if last else 0.0
    largest = max((p.allocated for p in params), default=0)
    optim = getattr(cfg, "optim", None)
    return StageMemory(
        stage=stage, dense_params=dense, expert_params=experts,
        weights=WEIGHT_BYTES * allocated, grads=GRAD_BYTES * allocated,
        optimizer=float(sum(optimizer_state_bytes(optim, p.spec) * p.held for p in params)),
        fsdp_buffers=buffers,
        activations=act, logits=logits,
        init_peak=WEIGHT_BYTES * allocated + TEMP_BYTES_PER_ELEMENT * min(chunk, largest),
        grad_accum=grad_accum, rank=rank,
    )


# -- the whole plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    name: str
    world_size: int
    layout: dict[str, int]
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    top_k: int
    num_experts: int
    params: ParamCounts
    flops: Flops
    granularity: float
    memory: list[StageMemory] = field(default_factory=list)
    # (min, max) of top_k over the run under model.moe.schedule.top_k.
    top_k_range: tuple[int, int] = (0, 0)
    recompute: str = "none"  # train.recompute

    @property
    def activation_ratio(self) -> float:
        return self.params.n_active / self.params.n_total

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.total)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst_stage
        return {
            "name": self.name,
            "world_size": self.world_size,
            "layout": self.layout,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "top_k": self.top_k,
            "top_k_range": list(self.top_k_range),
            "num_experts": self.num_experts,
            "params": {
                "total": self.params.n_total,
                "active": self.params.n_active,
                "main": self.params.n_main,
                "active_matmul": self.params.n_active_matmul,
                "by_component": {c: {"total": self.params.total[c], "active": self.params.active[c]}
                                 for c in COMPONENTS},
            },
            "recompute": self.recompute,
            "activation_ratio": self.activation_ratio,
            "granularity": self.granularity,
            "flops_per_token": {
                "train": self.flops.train,
                "forward": self.flops.forward,
                "matmul_forward": self.flops.matmul_forward,
                "attention_forward": self.flops.attention_forward,
            },
            "memory_bytes": {
                "worst_stage": worst.stage,
                "per_rank": {**asdict(worst), "total": worst.total},
                "stages": [{**asdict(m), "total": m.total} for m in self.memory],
            },
        }


def scheduled_top_k_range(cfg: Any) -> tuple[int, int]:
    """(min, max) of top_k over steps 0..train.max_steps-1 under model.moe.schedule.top_k.

    Every kind is monotone between its breakpoints, so the breakpoints bound it exactly.
    """
    from moetrain.model.moe.schedule import top_k_at

    sched = cfg.model.moe.schedule.top_k
    last = max(0, cfg.train.max_steps - 1)
    points = {0, last, sched.start_step, sched.end_step, *(int(m[0]) for m in sched.milestones)}
    ks = [top_k_at(cfg.model.moe, s) for s in points if 0 <= s <= last]
    return min(ks), max(ks)


def make_plan(cfg: Any, dims: ParallelDims, top_k: Optional[int] = None) -> Plan:
    """Everything the planner reports for a `MoetrainConfig` on the layout `dims`.

    `top_k` defaults to the largest k the top_k schedule reaches during the run (the static
    model.moe.top_k without a schedule): the peak FLOPs and memory.
    """
    model = cfg.model
    k_range = scheduled_top_k_range(cfg)
    k = k_range[1] if top_k is None else top_k
    return Plan(
        name=cfg.run.name,
        world_size=dims.world_size,
        layout={"tp": dims.tp, "cp": dims.cp, "pp": dims.pp, "dp": dims.dp, "ep": dims.ep,
                "etp": dims.etp, "edp": dims.edp, "vpp": dims.vpp},
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        top_k=k,
        num_experts=model.moe.num_experts,
        params=count_parameters(model, k),
        flops=flops_per_token(model, cfg.data.seq_len, k),
        granularity=granularity(model),
        memory=memory_per_rank(cfg, dims, k),
        top_k_range=k_range,
        recompute=str(getattr(cfg.train, "recompute", "none")),
    )


def min_world_size(parallel: Any) -> int:
    """The smallest world size both views divide: lcm(tp cp pp, etp ep pp)."""
    return math.lcm(parallel.tp * parallel.cp * parallel.pp, parallel.etp * parallel.ep * parallel.pp)


# -- text ---------------------------------------------------------------------------------------


def human(n: float, unit: str = "") -> str:
    """1.23 B, 4.56 M...; with a unit SI prefixes (P, T, G) instead of the count's B for billion."""
    big = "G" if unit else "B"
    scales = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, big), (1e6, "M"), (1e3, "K"))
    for scale, suffix in scales:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB (a tiny model would read 0.00 GiB)."""
    if n == 0:
        return "0"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    p = plan.params
    lay = plan.layout
    lines = [
        f"plan: {plan.name}  (seq_len {plan.seq_len}, micro-batch {plan.micro_batch_size}, "
        f"global batch {plan.global_batch_size}, top-{plan.top_k} of {plan.num_experts} experts)",
    ]
    lo, hi = plan.top_k_range
    if lo != hi:
        lines.append(f"  top_k is scheduled between {lo} and {hi} over the run; the numbers below "
                     f"use top_k={plan.top_k}")
    lines += ["", f"  {'parameters':<16}{'total':>12}{'active':>12}"]
    for c in COMPONENTS:
        if p.total[c]:
            lines.append(f"  {c:<16}{human(p.total[c]):>12}{human(p.active[c]):>12}")
    embed = p.total["embedding"] + p.total["output"]
    lines += [f"  {'all':<16}{human(p.n_total):>12}{human(p.n_active):>12}"]
    if p.total["mtp"]:  # DeepSeek-V3 reports the main model and its MTP modules apart
        lines.append(f"  {'main model':<16}{human(p.n_main):>12}"
                     f"{human(p.n_active - p.active['mtp']):>12}")
    lines += [
        f"  {'non-embedding':<16}{human(p.n_total - embed):>12}{human(p.n_active - embed):>12}",
        "",
        f"  activation ratio (active / total)        {plan.activation_ratio:.3f}",
        f"  granularity (ffn_hidden / expert_hidden) {plan.granularity:.2f}",
        f"  train FLOPs per token (3 x forward)      {human(plan.flops.train, 'FLOP')}",
        f"    forward: matmuls 2 x {human(p.n_active_matmul)} = "
        f"{human(plan.flops.matmul_forward, 'FLOP')}, attention {human(plan.flops.attention_forward, 'FLOP')}",
        f"  train FLOPs per step                     "
        f"{human(plan.flops.train * plan.seq_len * plan.global_batch_size, 'FLOP')}",
        "",
        f"memory per rank, world {plan.world_size}: dense tp{lay['tp']} cp{lay['cp']} dp{lay['dp']} "
        f"pp{lay['pp']}, MoE ep{lay['ep']} etp{lay['etp']} edp{lay['edp']}",
        f"  {'stage':<7}{'params':>10}{'weights':>12}{'grads':>12}{'optimizer':>12}"
        f"{'fsdp buf':>12}{'grad accum':>12}{'activations':>13}{'logits':>12}{'total':>12}"
        f"{'init peak':>12}",
    ]
    worst = plan.worst_stage.stage
    for m in plan.memory:
        mark = " <- peak" if m.stage == worst and len(plan.memory) > 1 else ""
        lines.append(
            f"  {m.stage:<7}{human(m.dense_params + m.expert_params):>10}{gib(m.weights):>12}"
            f"{gib(m.grads):>12}{gib(m.optimizer):>12}{gib(m.fsdp_buffers):>12}"
            f"{gib(m.grad_accum):>12}{gib(m.activations):>13}{gib(m.logits):>12}{gib(m.total):>12}"
            f"{gib(m.init_peak):>12}{mark}"
        )
    recompute = {"none": "no recompute", "moe": "the MoE layers recomputed",
                 "full": "whole blocks recomputed"}[plan.recompute]
    lines.append("  (per parameter: fp32 weights 4 B + fp32 grads 4 B + AdamW fp32 exp_avg/exp_avg_sq "
                 "8 B (Muon's matrices: one momentum buffer, 4 B), as allocated; bf16 autocast "
                 f"activations, {recompute} (train.recompute); "
                 "fsdp buf: gathered fp32 units; grad accum: FSDP's unsharded fp32 gradients "
                 "between micro-batches; init peak: the weights + one init chunk, before training)")
    return "\n".join(lines)
