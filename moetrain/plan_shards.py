"""The parameters one rank holds, tensor by tensor, exactly as moetrain builds and shards them.

    units = rank_units(cfg, dims, rank)    # the rank's FSDP units (or replicated groups), in order

No model is built: the parameter list mirrors `moetrain.model.Transformer` (names, shapes and
registration order), the sharding mirrors moetrain/parallel: tensor parallelism splits the
colwise / rowwise / vocab-parallel weights with `torch.chunk`'s sizes (DTensor's `Shard`) and
keeps norms and MLA's latent path as Replicate DTensors; expert parallelism gives EP rank r
experts [r E/ep, (r+1) E/ep) and ETP rank s hidden columns [s F/etp, (s+1) F/etp); pipeline
stages take their layers (`split_layers`), the first the embedding, the last the final norm and
output. FSDP2 (`data_parallel.apply_data_parallel`) groups them into units - each block, its
MoE experts (over edp, where those ranks differ from dp_cp_tp) and the rest of its MoE layer
(over dp_cp_tp, where those differ from the block's dp_cp), and a root per stage module
(embedding, norm, output) - and shards dim 0 of each tensor over the unit's group, padding it
to a multiple of the group size. Without FSDP the same units replicate (FSDP2's replicate
dimension): whole tensors, their gradients all-reduced over the unit's group.

`moetrain.dryrun` builds the real model under a fake process group and checks these numbers
tensor-free against it; the planner's memory (`planning.memory_per_rank`) and communication
(`plan_comm`) are sums over them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from moetrain.config.schema import head_dim_of
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.pipeline.split import split_layers, stage_indices
from moetrain.parallel.pipeline.stages import last_stage_embeds


@dataclass(frozen=True)
class ParamSpec:
    """One parameter tensor of the full model."""

    name: str  # as `Transformer.named_parameters()` names it
    shape: tuple[int, ...]  # global shape
    component: str  # planning.COMPONENTS entry it counts under
    kind: str  # dense | router | shared | experts: which gradient group it belongs to
    tp_dim: Optional[int] = None  # the dim tensor parallelism splits (None: not split)
    tp_replicated: bool = False  # a Replicate DTensor over TP (gradient all-reduced over TP)


def _specs_attention(model: Any, prefix: str) -> list[ParamSpec]:
    d, H = model.d_model, model.n_heads
    out: list[ParamSpec] = []

    def add(name, shape, tp_dim=None, replicated=False, component="attention"):
        out.append(ParamSpec(f"{prefix}.{name}", tuple(shape), component, "dense", tp_dim,
                             replicated))

    if getattr(model, "attention", "gqa") == "mla":
        m = model.mla
        q_h = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            add("wq.weight", (H * q_h, d), tp_dim=0)
        else:
            add("wq_a.weight", (m.q_lora_rank, d), replicated=True)
            add("q_a_norm.weight", (m.q_lora_rank,), replicated=True)
            add("wq_b.weight", (H * q_h, m.q_lora_rank), tp_dim=0)
        add("wkv_a.weight", (m.kv_lora_rank, d), replicated=True)
        add("kv_a_norm.weight", (m.kv_lora_rank,), replicated=True)
        add("wk_rope.weight", (m.qk_rope_head_dim, d), replicated=True)
        add("wkv_b.weight", (H * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank), tp_dim=0)
        add("wo.weight", (d, H * m.v_head_dim), tp_dim=1)
        return out
    h, Hkv = head_dim_of(model), model.n_kv_heads
    add("wq.weight", (H * h, d), tp_dim=0)
    add("wk.weight", (Hkv * h, d), tp_dim=0)
    add("wv.weight", (Hkv * h, d), tp_dim=0)
    add("wo.weight", (d, H * h), tp_dim=1)
    qk_norm = getattr(model, "qk_norm", "none")
    if qk_norm == "head":  # one weight over head_dim, shared by the heads: replicated over TP
        add("q_norm.weight", (h,), replicated=True)
        add("k_norm.weight", (h,), replicated=True)
    elif qk_norm == "full":  # over the whole projection: split like it
        add("q_norm.weight", (H * h,), tp_dim=0)
        add("k_norm.weight", (Hkv * h,), tp_dim=0)
    return out


def block_specs(model: Any, layer: int) -> list[ParamSpec]:
    """The parameters of transformer block `layer`, in registration order."""
    dense = layer < model.moe.first_dense_layers
    return [dataclasses.replace(s, name=s.name.format(layer=layer))
            for s in _block_template(_shape_key(model), dense)]


def _shape_key(model: Any) -> tuple:
    """Every ModelConfig field a block's parameter shapes depend on (a hashable cache key)."""
    moe, mla = model.moe, model.mla
    return (model.d_model, model.n_heads, model.n_kv_heads, head_dim_of(model),
            getattr(model, "attention", "gqa"), getattr(model, "qk_norm", "none"),
            (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
             mla.v_head_dim), model.ffn_hidden, moe.num_experts, moe.expert_hidden,
            moe.routing.num_null_experts, moe.num_shared_experts, moe.shared_expert_hidden,
            moe.shared_expert_gate)


@functools.lru_cache(maxsize=64)
def _block_template(key: tuple, dense: bool) -> tuple[ParamSpec, ...]:
    (d, H, Hkv, h, attention, qk_norm, mla, F, E, Fe, null, n_shared, Fs_one, gate) = key
    model = SimpleNamespace(
        d_model=d, n_heads=H, n_kv_heads=Hkv, head_dim=h, attention=attention, qk_norm=qk_norm,
        mla=SimpleNamespace(q_lora_rank=mla[0], kv_lora_rank=mla[1], qk_nope_head_dim=mla[2],
                            qk_rope_head_dim=mla[3], v_head_dim=mla[4]))
    p = "layers.{layer}"
    norm = dict(component="norms", kind="dense", tp_replicated=True)
    out = [ParamSpec(f"{p}.attention_norm.weight", (d,), **norm)]
    out += _specs_attention(model, f"{p}.attention")
    out.append(ParamSpec(f"{p}.ffn_norm.weight", (d,), **norm))
    if dense:
        out += [ParamSpec(f"{p}.mlp.w1.weight", (F, d), "dense_mlp", "dense", 0),
                ParamSpec(f"{p}.mlp.w3.weight", (F, d), "dense_mlp", "dense", 0),
                ParamSpec(f"{p}.mlp.w2.weight", (d, F), "dense_mlp", "dense", 1)]
        return tuple(out)
    slots = E + null  # null experts are router columns without weights
    out += [ParamSpec(f"{p}.moe.router.weight", (slots, d), "router", "router"),
            ParamSpec(f"{p}.moe.experts.w1", (E, d, Fe), "routed_experts", "experts"),
            ParamSpec(f"{p}.moe.experts.w3", (E, d, Fe), "routed_experts", "experts"),
            ParamSpec(f"{p}.moe.experts.w2", (E, Fe, d), "routed_experts", "experts")]
    if n_shared:
        Fs = n_shared * (Fs_one or Fe)
        out += [ParamSpec(f"{p}.moe.shared_experts.w1.weight", (Fs, d), "shared_experts", "shared"),
                ParamSpec(f"{p}.moe.shared_experts.w3.weight", (Fs, d), "shared_experts", "shared"),
                ParamSpec(f"{p}.moe.shared_experts.w2.weight", (d, Fs), "shared_experts", "shared")]
        if gate:
            out.append(ParamSpec(f"{p}.moe.shared_expert_gate.weight", (1, d), "shared_experts",
                                 "shared"))
    return tuple(out)


def _expert_hidden_dim(spec: ParamSpec) -> int:
    return 1 if spec.name.endswith(".w2") else 2  # w1, w3 [E, D, F]; w2 [E, F, D]


# -- one rank's shards ---------------------------------------------------------------------------


def chunk_size(n: int, parts: int, index: int) -> int:
    """Size of chunk `index` of `torch.chunk` over `n` rows into `parts` (ceil-sized chunks, the
    last ones shorter or empty): what DTensor's Shard and FSDP2 give each rank."""
    step = -(-n // parts)
    return max(0, min(step, n - index * step))


@dataclass
class LocalParam:
    spec: ParamSpec
    local: tuple[int, ...]  # shape after TP / EP / ETP (what FSDP then shards along dim 0)
    held: int  # elements this rank holds (after FSDP; unpadded)
    allocated: int  # elements of the rank's storage (FSDP2 pads dim 0 to a multiple of n)

    @property
    def unsharded(self) -> int:
        """Elements after TP / EP but before FSDP (what an all-gather rebuilds, unpadded)."""
        return math.prod(self.local)


@dataclass
class Unit:
    """An FSDP unit (or, without FSDP, a group of parameters whose gradients one reducer sums)."""

    name: str  # the module it wraps, e.g. "layers.3", "layers.3.moe.experts", "" (stage root)
    group: str  # the group kind its gradients are reduced over: dp_cp | dp_cp_tp | edp
    size: int  # that group's size
    params: list[LocalParam]
    root: bool  # a stage module's root unit (FSDP: not resharded after forward)
    virtual_stage: int  # the pipeline's virtual stage holding it (0 without PP)
    layer: Optional[int] = None  # the block it belongs to: fills "{layer}" in the names

    def names(self) -> list[str]:
        """The model's names of the unit's parameters."""
        return [p.spec.name.format(layer=self.layer) for p in self.params]

    @property
    def held(self) -> int:
        return sum(p.held for p in self.params)

    @property
    def allocated(self) -> int:
        return sum(p.allocated for p in self.params)

    @property
    def unsharded(self) -> int:
        return sum(p.unsharded for p in self.params)

    @property
    def gathered(self) -> int:
        """Elements of the unit's all-gather output (= its reduce-scatter input)."""
        return sum(p.allocated for p in self.params) * self.size


def _localise(spec: ParamSpec, dims: ParallelDims, rank: int) -> tuple[int, ...]:
    shape = list(spec.shape)
    if spec.kind == "experts":  # every EP rank the same number of experts (checks.py)
        shape[0] //= dims.ep
        shape[_expert_hidden_dim(spec)] //= dims.etp
    elif spec.tp_dim is not None and dims.tp > 1:
        shape[spec.tp_dim] = chunk_size(shape[spec.tp_dim], dims.tp, dims.dense_coord(rank).tp)
    return tuple(shape)


def _local_param(spec: ParamSpec, dims: ParallelDims, rank: int, group: list[int],
                 fsdp: bool) -> LocalParam:
    local = _localise(spec, dims, rank)
    numel = math.prod(local)
    n = len(group)
    if not fsdp or n == 1:
        return LocalParam(spec, local, numel, numel)
    rest = math.prod(local[1:])
    held = chunk_size(local[0], n, group.index(rank)) * rest
    return LocalParam(spec, local, held, -(-local[0] // n) * rest)


def stage_modules(model: Any, dims: ParallelDims, pp_layers: Optional[list[int]],
                  pp_rank: int) -> list[tuple[int, list[int], bool, bool]]:
    """(virtual stage, layer ids, holds the embedding, holds the norm and output) of each stage
    module pp rank `pp_rank` holds, in pipeline order."""
    if dims.pp == 1:
        return [(0, list(range(model.n_layers)), True, True)]
    split = split_layers(model.n_layers, dims.pp, dims.vpp, pp_layers)
    last = dims.pp * dims.vpp - 1
    return [(v, split[v], v == 0, v == last) for v in stage_indices(pp_rank, dims.pp, dims.vpp)]


def rank_units(cfg: Any, dims: ParallelDims, rank: int) -> list[Unit]:
    """The parameters `rank` holds under `cfg` (a `MoetrainConfig`) and `dims`, grouped as the
    code groups them: FSDP units in the order `apply_data_parallel` creates them (each block's MoE units,
    the block, then the stage root), or, without FSDP, the same groups one per module."""
    model, par = cfg.model, cfg.parallel
    fsdp = par.fsdp.enabled
    pp_rank = dims.dense_coord(rank).pp
    ranks = {k: dims.group_of(k, rank) for k in ("dp_cp", "dp_cp_tp", "edp")}
    units: list[Unit] = []
    # Every block of a kind (dense, MoE) holds the same shards: its units are made once and
    # shared by the blocks, which only differ in the name's "{layer}".
    templates: dict[bool, list[tuple[str, str, list[LocalParam]]]] = {}

    def local(specs: list[ParamSpec], group: str) -> list[LocalParam]:
        return [_local_param(s, dims, rank, ranks[group], fsdp) for s in specs]

    def block_units(dense: bool) -> list[tuple[str, str, list[LocalParam]]]:
        specs = list(_block_template(_shape_key(model), dense))
        block = [s for s in specs if s.kind == "dense"]
        experts = [s for s in specs if s.kind == "experts"]
        rest = [s for s in specs if s.kind in ("router", "shared")]
        out = []
        # apply_data_parallel: the experts their own unit over edp unless those are the ranks of
        # the MoE layer's other parameters (dp_cp_tp); the MoE layer (what is not yet wrapped)
        # one over dp_cp_tp unless those are the block's ranks (dp_cp); the rest the block's.
        if experts and ranks["edp"] != ranks["dp_cp_tp"]:
            out.append(("layers.{layer}.moe.experts", "edp", local(experts, "edp")))
        else:
            rest += experts
        if rest and ranks["dp_cp_tp"] != ranks["dp_cp"]:
            out.append(("layers.{layer}.moe", "dp_cp_tp", local(rest, "dp_cp_tp")))
        else:
            block += rest
        order = {s.name: i for i, s in enumerate(specs)}
        block.sort(key=lambda s: order[s.name])
        out.append(("layers.{layer}", "dp_cp", local(block, "dp_cp")))
        return out

    for v, layers, first, last in stage_modules(model, dims, par.pp_layers, pp_rank):
        for layer in layers:
            dense = layer < model.moe.first_dense_layers
            if dense not in templates:
                templates[dense] = block_units(dense)
            for name, group, params in templates[dense]:
                units.append(Unit(name.format(layer=layer), group, len(ranks[group]), params,
                                  False, v, layer))
        if last:
            units += mtp_units(model, v, ranks, block_units, local)
        root = []
        # The last stage holds a copy of the embedding the MTP modules and a tied head share
        # (pipeline/stages.py); a tied head is that embedding, not a parameter of its own.
        if first or (last and last_stage_embeds(model)):
            root.append(ParamSpec("tok_embeddings.weight", (model.vocab_size, model.d_model),
                                  "embedding", "dense", 0))
        if last:
            root.append(ParamSpec("norm.weight", (model.d_model,), "norms", "dense",
                                  tp_replicated=True))
            if not model.tie_embeddings:
                root.append(ParamSpec("output.weight", (model.vocab_size, model.d_model),
                                      "output", "dense", 0))
        units.append(Unit("", "dp_cp", len(ranks["dp_cp"]), local(root, "dp_cp"), True, v))
    return units


def mtp_units(model: Any, virtual_stage: int, ranks: dict[str, list[int]], block_units,
              local) -> list[Unit]:
    """The multi-token-prediction modules' units (moetrain/model/mtp.py; on the last stage), in
    the order `apply_data_parallel` wraps them: every module's block as the main blocks are
    wrapped (`block_units(dense)`, named mtp.<k>.block), then each module's own unit - its
    RMSNorms (replicated over TP) and its projection [2d -> d] (colwise: split over TP).
    `block_units` and `local` are `rank_units`' (a block's units; specs to this rank's shards)."""
    depth = getattr(getattr(model, "mtp", None), "depth", 0)
    if not depth:
        return []
    dense, d = model.mtp.block == "dense", model.d_model
    units = []
    for k in range(depth):
        prefix = f"mtp.{k}.block"
        for name, group, params in block_units(dense):
            params = [dataclasses.replace(p, spec=dataclasses.replace(
                p.spec, name=p.spec.name.replace("layers.{layer}", prefix), component="mtp"))
                for p in params]
            units.append(Unit(name.replace("layers.{layer}", prefix), group, len(ranks[group]),
                              params, False, virtual_stage))
    for k in range(depth):
        p = f"mtp.{k}"
        norm = dict(component="mtp", kind="dense", tp_replicated=True)
        specs = [ParamSpec(f"{p}.enorm.weight", (d,), **norm),
                 ParamSpec(f"{p}.hnorm.weight", (d,), **norm),
                 ParamSpec(f"{p}.eh_proj.weight", (d, 2 * d), "mtp", "dense", 0),
                 ParamSpec(f"{p}.norm.weight", (d,), **norm)]
        units.append(Unit(p, "dp_cp", len(ranks["dp_cp"]), local(specs, "dp_cp"), False,
                          virtual_stage))
    return units


__all__ = ["LocalParam", "ParamSpec", "Unit", "block_specs", "chunk_size", "mtp_units",
           "rank_units", "stage_modules"]
