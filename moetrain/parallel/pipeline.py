"""Pipeline parallelism: split the model into stages and run torch's pipeline schedules on them.

    split_layers(n_layers, pp, vpp)           layer ids of every virtual stage (even, balanced
                                              by a cost estimate, or explicit)
    build_stage_modules(model, pp_rank, ...)  this rank's stages: copies of the plain model with
                                              the other layers deleted (parameter names unchanged)
    build_pipeline(stage_modules, ...)        torch.distributed.pipelining stages + schedule,
                                              the loss function and the MoE statistics hooks
    pipeline_train_step(pipe, inputs, targets)  one optimizer step's micro-batches; returns the
                                              local LM loss sum on the last stage, else None
    pipe.model                                this rank's stages as one module with the full
                                              model's names (optimizer, checkpoints, clipping)
    pipe.moe_stats.gather(n_mb, pp_group)     every MoE layer's statistics per micro-batch
    reduce_over_pp(loss_sum, pipe)            the last stage's loss sum on every pp rank

Placement: virtual stage s runs on pp rank s % pp, so rank r holds stages r, r + pp, ...
("looped" placement, as torchtitan and Megatron-Core interleave; torch's Interleaved1F1B and
InterleavedZeroBubble schedules assume it via `generate_stage_to_rank_mapping`).

Schedules (`parallel.pp_schedule`; torch class):
    gpipe        ScheduleGPipe                   one stage per rank (vpp = 1)
    1f1b         Schedule1F1B                    one stage per rank (vpp = 1)
    interleaved  ScheduleInterleaved1F1B         vpp >= 1 stages per rank
    zero_bubble  ScheduleInterleavedZeroBubble   vpp >= 1 (ZB1P: backward split into input
                                                 and weight gradients; the V-shaped
                                                 ScheduleZBVZeroBubble needs another placement
                                                 and is not offered)

Losses. The schedule calls the loss function once per micro-batch on the last stage; it returns
sum-CE / tokens_per_step (the global tokens of the step), as the non-pipelined loop does, and
`scale_grads=False`, so the gradients summed over micro-batches (and DP ranks) are those of the
global mean. The MoE aux losses need no pipeline support: `AttachAuxLoss` feeds them their
gradient from the backward of the layer's hidden output, whichever stage that is on.

Shapes. Stages get their boundary shapes statically ([mb, S] token ids in, [mb, S, D] hidden
states between stages, in the activation dtype), so torch runs no metadata-inference forward.
Under TP the boundary is each rank's plain sequence shard [mb, S/tp, D] (`sequence_shards`;
`apply_tensor_parallel` unwraps and rewraps the residual stream at a stage's ends), so it stays
static. `static_shapes=False` lets torch infer shapes from a first forward/backward instead
(e.g. for stages that exchange DTensors); that extra pass leaves no trace in the MoE
statistics, the global-LBL counts or the LM loss sum (see `_MoEAwareStage`).

Tied embeddings are refused for pp * vpp > 1 (first and last stage would hold separate copies
of one weight whose gradients must be summed and whose norm must be counted once; no shipped
config ties them).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from moetrain.model.moe.layer import MoELayer, MoEStats
from moetrain.model.moe.losses import in_backward
from moetrain.parallel.dims import PP_SCHEDULES, LayoutError, validate_pipeline

#: parallel.pp_schedule -> (torch schedule class, whether it runs several stages per rank).
SCHEDULES = {
    name: (cls, PP_SCHEDULES[name])
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B),
                      ("interleaved", ScheduleInterleaved1F1B),
                      ("zero_bubble", ScheduleInterleavedZeroBubble))
}


# --------------------------------------------------------------------------------- layer split

@dataclass(frozen=True)
class StageCosts:
    """Relative cost of each transformer layer, and what the first / last stage carries extra."""

    layers: tuple[float, ...]
    embedding: float = 0.0  # on the first virtual stage
    head: float = 0.0  # final norm + output projection + loss, on the last virtual stage


def estimate_costs(model_cfg, seq_len: int) -> StageCosts:
    """Forward matmul FLOPs per token of each layer, the embedding and the output head.

    The estimate (backward costs about twice the forward for every part, so forward ratios
    suffice): attention 2·D·(q + 2 kv) + 2·q·D projections + 2·S·q scores (causal: half of
    QKᵀ and AV); dense FFN 6·D·F; MoE 2·D·E router + top_k · 6·D·F_e + 6·D·F_shared; head
    2·D·V. The embedding is a lookup: 0 FLOPs (memory-bound; set StageCosts.embedding to
    weigh it). Layers whose shapes are equal get equal costs.
    """
    m, moe = model_cfg, model_cfg.moe
    hd = m.head_dim or m.d_model // m.n_heads
    q, kv, D = m.n_heads * hd, m.n_kv_heads * hd, m.d_model
    attention = 2 * D * (q + 2 * kv) + 2 * q * D + 2 * seq_len * q
    shared = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden)
    moe_ffn = 2 * D * moe.num_experts + moe.top_k * 6 * D * moe.expert_hidden + 6 * D * shared
    layers = tuple(
        float(attention + (6 * D * m.ffn_hidden if i < moe.first_dense_layers else moe_ffn))
        for i in range(m.n_layers)
    )
    return StageCosts(layers, embedding=0.0, head=float(2 * D * m.vocab_size))


def split_layers(
    n_layers: int,
    pp: int,
    vpp: int = 1,
    costs: Optional[StageCosts] = None,
    explicit: Optional[Sequence[int]] = None,
) -> list[list[int]]:
    """The layer ids of each of the pp·vpp virtual stages, in pipeline order (contiguous).

    explicit: layer counts per virtual stage (sum n_layers; first and last stage may hold 0
    layers, the others at least 1). Otherwise the split minimises the largest stage cost
    (layer costs plus `costs.embedding` on stage 0 and `costs.head` on the last), then the sum
    of squared stage costs, ties going to later stages (1F1B's early stages hold more
    micro-batches' activations); every stage gets at least one layer. costs=None: all layers
    cost the same and nothing extra, i.e. the even split when pp·vpp divides n_layers.
    """
    stages = pp * vpp
    if pp < 1 or vpp < 1:
        raise LayoutError(f"parallel.pp = {pp} and parallel.vpp = {vpp} must be >= 1",
                          ("parallel.pp", "parallel.vpp"))
    if explicit is not None:
        counts = [int(c) for c in explicit]
        if len(counts) != stages:
            raise LayoutError(
                f"the explicit layer split {counts} has {len(counts)} entries; "
                f"parallel.pp*parallel.vpp = {pp}*{vpp} = {stages} stages need one each",
                ("parallel.pp", "parallel.vpp"))
        if sum(counts) != n_layers:
            raise LayoutError(
                f"the explicit layer split {counts} sums to {sum(counts)}, "
                f"model.n_layers = {n_layers}", ("model.n_layers",))
        for s, c in enumerate(counts):
            least = 0 if s in (0, stages - 1) else 1
            if c < least:
                raise LayoutError(
                    f"the explicit layer split {counts} gives stage {s} {c} layers; a middle "
                    "stage needs at least one and none may be negative", ("model.n_layers",))
    else:
        if n_layers < stages:
            raise LayoutError(
                f"model.n_layers = {n_layers} is fewer than parallel.pp*parallel.vpp = "
                f"{pp}*{vpp} = {stages} stages", ("model.n_layers", "parallel.pp", "parallel.vpp"))
        costs = costs or StageCosts((1.0,) * n_layers)
        if len(costs.layers) != n_layers:
            raise ValueError(f"{len(costs.layers)} layer costs for {n_layers} layers")
        counts = _balanced_counts(list(costs.layers), stages, costs.embedding, costs.head)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def _balanced_counts(layer_costs: list[float], k: int, first: float, last: float) -> list[int]:
    """Contiguous split of the layers into k non-empty parts: min of max part, then of sum of
    squares (dynamic programming, O(k n²) - n and k are at most a few hundred)."""
    n = len(layer_costs)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def load(s: int, i: int, j: int) -> float:  # stage s holds layers i..j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0.0) + (last if s == k - 1 else 0.0)

    inf = float("inf")
    # best_max[s][j]: smallest possible largest load of stages 0..s holding layers 0..j-1.
    best_max = [[inf] * (n + 1) for _ in range(k)]
    for j in range(1, n + 1):
        best_max[0][j] = load(0, 0, j)
    for s in range(1, k):
        for j in range(s + 1, n + 1):
            best_max[s][j] = min(max(best_max[s - 1][i], load(s, i, j)) for i in range(s, j))
    bound = best_max[k - 1][n] * (1 + 1e-12) + 1e-12
    # Among splits whose every stage is within the bound: least sum of squared loads.
    sq = [[inf] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for j in range(1, n + 1):
        if load(0, 0, j) <= bound:
            sq[0][j] = load(0, 0, j) ** 2
    for s in range(1, k):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                cost = load(s, i, j)
                if cost <= bound and sq[s - 1][i] + cost * cost < sq[s][j]:
                    sq[s][j], cut[s][j] = sq[s - 1][i] + cost * cost, i
    counts, j = [], n
    for s in range(k - 1, 0, -1):
        counts.append(j - cut[s][j])
        j = cut[s][j]
    counts.append(j)
    return counts[::-1]


def stage_indices(pp_rank: int, pp: int, vpp: int = 1) -> list[int]:
    """The virtual stages of a pp rank: pp_rank + v·pp for v < vpp (looped placement)."""
    return [pp_rank + v * pp for v in range(vpp)]


# ------------------------------------------------------------------------------ stage modules

@dataclass
class StageModule:
    """One virtual stage of this rank: its index, its layers and its module."""

    index: int
    num_stages: int
    layer_ids: list[int]
    module: nn.Module

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def build_stage_modules(
    model: nn.Module,
    pp_rank: int,
    pp: int,
    vpp: int = 1,
    *,
    costs: Optional[StageCosts] = None,
    explicit: Optional[Sequence[int]] = None,
) -> list[StageModule]:
    """This rank's stages of a plain `Transformer`, in stage order.

    Each is a deep copy holding only its layers (keys of `layers` unchanged, so parameter names
    equal the full model's), `tok_embeddings` only on stage 0, `norm` and `output` only on the
    last stage (None elsewhere). `model` itself is left as it was; it may live on the meta
    device (then `to_empty` and `init_weights(seed)` each stage: per-name seeding gives the full
    model's values).
    """
    n_layers = len(model.layers)
    num_stages = pp * vpp
    if num_stages > 1 and _has_tied_embeddings(model):
        raise LayoutError(
            "model.tie_embeddings = true is not supported with pipeline parallelism "
            f"(parallel.pp*parallel.vpp = {pp}*{vpp}): the embedding and the output head sit "
            "on different stages; untie them", ("model.tie_embeddings", "parallel.pp"))
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp - 1}")
    split = split_layers(n_layers, pp, vpp, costs=costs, explicit=explicit)
    keys = list(model.layers.keys())
    return [
        StageModule(s, num_stages, split[s],
                    _copy_stage(model, [keys[i] for i in split[s]], s == 0, s == num_stages - 1))
        for s in stage_indices(pp_rank, pp, vpp)
    ]


class RankModel(nn.Module):
    """This rank's stages as one module with the full model's parameter names and order
    (tok_embeddings, layers.<id>..., norm, output; absent parts None) - the modules are the
    stages' own, not copies. Hand it to what takes "the model": the optimizer, the checkpoint
    state dicts (keys match any other layout's), gradient clipping, train()/eval(). It has no
    forward: the schedule runs the stages."""

    def __init__(self, stage_modules: Sequence[StageModule]) -> None:
        super().__init__()
        first = next((s.module for s in stage_modules if s.is_first), None)
        last = next((s.module for s in stage_modules if s.is_last), None)
        self.tok_embeddings = first.tok_embeddings if first is not None else None
        self.layers = nn.ModuleDict()
        for sm in sorted(stage_modules, key=lambda s: s.index):
            for key, block in sm.module.layers.items():
                self.layers[key] = block
        self.norm = last.norm if last is not None else None
        self.output = last.output if last is not None else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline's stages run through pipeline_train_step, not RankModel")


def _has_tied_embeddings(model: nn.Module) -> bool:
    emb, out = model.tok_embeddings, model.output
    tied_cfg = bool(getattr(getattr(model, "cfg", None), "tie_embeddings", False))
    return tied_cfg or (emb is not None and out is not None and out.weight is emb.weight)


def _copy_stage(model: nn.Module, keep: list[str], first: bool, last: bool) -> nn.Module:
    """Deep-copy `model` without the parts other stages hold (so they are never copied)."""
    saved = {name: getattr(model, name) for name in ("layers", "tok_embeddings", "norm", "output")}
    try:
        model.layers = nn.ModuleDict({key: saved["layers"][key] for key in keep})
        if not first:
            model.tok_embeddings = None
        if not last:
            model.norm = None
            model.output = None
        return copy.deepcopy(model)
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


# ------------------------------------------------------------------------------- the pipeline

_metadata_pass = False  # True while torch runs a stage's shape-inference forward / backward
CESum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> sum of CE


class PipelineLoss:
    """The schedule's loss_fn: sum-CE / tokens_per_step; keeps each micro-batch's CE sum."""

    def __init__(self, tokens_per_step: int, cross_entropy_sum: Optional[CESum] = None):
        self.tokens_per_step = tokens_per_step
        self.cross_entropy_sum = cross_entropy_sum or _cross_entropy_sum
        self.sums: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss_sum = self.cross_entropy_sum(logits, targets)
        if not _metadata_pass:
            self.sums.append(loss_sum.detach())
        return loss_sum / self.tokens_per_step

    def total(self) -> torch.Tensor:
        """fp64 sum over the micro-batches so far, added in micro-batch order."""
        total = torch.zeros((), dtype=torch.float64, device=self.sums[0].device)
        for s in self.sums:
            total += s.to(torch.float64)
        return total


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


class MoEStatsRecorder:
    """Each MoE layer's statistics of every micro-batch of a step, via forward hooks.

    `collect_moe_stats` after a schedule sees only each layer's last forward; the trainer needs
    one list per micro-batch. A hook appends the layer's `last_stats` after every training
    forward (not in activation-checkpoint recomputes, not in torch's shape-inference pass);
    every stage runs its micro-batches' forwards in order, so the n-th record is micro-batch n.
    Layers are numbered globally (the full model's MoE layers in order) so `gather` can merge
    the stages' records over the pp group.
    """

    def __init__(self, modules: Sequence[nn.Module], model_cfg) -> None:
        moe_ids = [i for i in range(model_cfg.n_layers) if i >= model_cfg.moe.first_dense_layers]
        self.num_layers = len(moe_ids)
        self.num_experts = model_cfg.moe.num_experts
        self.num_slots = model_cfg.moe.num_experts + model_cfg.moe.routing.num_null_experts
        self.records: dict[int, list[MoEStats]] = {}
        self._handles = []
        for module in modules:
            for name, layer in module.named_modules():
                if isinstance(layer, MoELayer):
                    index = moe_ids.index(_layer_id(name))
                    self.records[index] = []
                    self._handles.append(layer.register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def record(layer: MoELayer, args, output) -> None:
            if layer.training and not in_backward() and not _metadata_pass:
                self.records[index].append(layer.last_stats)
        return record

    def reset(self) -> None:
        for records in self.records.values():
            records.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def gather(self, n_microbatches: int,
               group: Optional[dist.ProcessGroup]) -> list[list[MoEStats]]:
        """Per micro-batch, every MoE layer of the model (global order): this rank's records
        merged with the other stages' by one all-reduce over `group` (each layer lives on one
        stage). Feed each entry to `RoutingAccumulator.add`."""
        distributed = group is not None and dist.get_world_size(group) > 1
        first = next((r[0] for r in self.records.values() if r), None)
        device = _group_device(group) if distributed else (
            first.lbl.device if first is not None else torch.device("cpu"))
        # Built where the statistics are (no host sync per value), copied to the host once.
        # Per layer: 6 scalars, tokens_per_expert [E], slot_counts [N], prob_sum [N].
        E, N = self.num_experts, self.num_slots
        packed = torch.zeros(n_microbatches, self.num_layers, 6 + E + 2 * N,
                             dtype=torch.float64, device=device)
        for index, records in self.records.items():
            if len(records) != n_microbatches:
                raise RuntimeError(f"MoE layer {index} recorded {len(records)} forwards in a step "
                                   f"of {n_microbatches} micro-batches")
            for mb, s in enumerate(records):
                scalars = torch.stack([s.lbl.detach().double(), s.z_loss.detach().double(),
                                       s.dropped.double(), s.lbl.new_tensor(float(s.assignments),
                                                                            dtype=torch.float64),
                                       s.router_entropy.double(),
                                       s.lbl.new_tensor(float(s.tokens), dtype=torch.float64)])
                row = packed[mb, index]
                row[:6] = scalars.to(device)
                row[6:6 + E] = s.tokens_per_expert.double().to(device)
                if s.slot_counts is not None:
                    row[6 + E:6 + E + N] = s.slot_counts.double().to(device)
                    row[6 + E + N:] = s.prob_sum.detach().double().to(device)
        if distributed:
            dist.all_reduce(packed, group=group)
        packed = packed.cpu()
        return [
            [MoEStats(lbl=row[0], z_loss=row[1], tokens_per_expert=row[6:6 + E].round().long(),
                      dropped=row[2].round().long(), assignments=int(round(float(row[3]))),
                      router_entropy=row[4], tokens=int(round(float(row[5]))),
                      slot_counts=row[6 + E:6 + E + N].round().long(), prob_sum=row[6 + E + N:])
             for row in packed[mb]]
            for mb in range(n_microbatches)
        ]


def _layer_id(module_name: str) -> int:
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])


def _group_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _MoEAwareStage(PipelineStage):
    """A PipelineStage whose shape-inference pass (static_shapes=False) leaves no side effects:
    the global-scope LBL counts and each MoE layer's `last_stats` are restored, and the
    statistics hooks and the loss function ignore it."""

    def _forward_metadata_inference(self, *args, **kwargs):
        with _without_moe_side_effects(self.submod):
            return super()._forward_metadata_inference(*args, **kwargs)

    def _backward_metadata_inference(self, *args, **kwargs):
        with _without_moe_side_effects(self.submod):
            return super()._backward_metadata_inference(*args, **kwargs)


@contextmanager
def _without_moe_side_effects(module: nn.Module) -> Iterator[None]:
    global _metadata_pass
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    saved = [(m.last_stats, m.lbl.step_counts_E.clone()) for m in layers]
    _metadata_pass = True
    try:
        yield
    finally:
        _metadata_pass = False
        for m, (stats, counts) in zip(layers, saved):
            m.last_stats = stats
            m.lbl.step_counts_E.copy_(counts)


@dataclass
class Pipeline:
    """This rank's part of the pipeline: stages, schedule, loss and statistics recorder."""

    schedule: object
    stages: list[PipelineStage]
    stage_modules: list[StageModule]
    model: RankModel
    loss: PipelineLoss
    moe_stats: MoEStatsRecorder
    group: Optional[dist.ProcessGroup]
    n_microbatches: int

    @property
    def modules(self) -> list[nn.Module]:
        return [s.module for s in self.stage_modules]

    @property
    def is_first(self) -> bool:
        return any(s.is_first for s in self.stage_modules)

    @property
    def is_last(self) -> bool:
        return any(s.is_last for s in self.stage_modules)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the full model's names."""
        return self.model.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()


def build_pipeline(
    stage_modules: list[StageModule],
    *,
    schedule: str,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    n_microbatches: int,
    micro_batch_size: int,
    seq_len: int,
    tokens_per_step: int,
    model_cfg,
    cross_entropy_sum: Optional[CESum] = None,
    activation_dtype: Optional[torch.dtype] = None,
    static_shapes: bool = True,
    sequence_shards: int = 1,
) -> Pipeline:
    """Wrap this rank's stage modules (already parallelized/sharded: FSDP2 roots are fine,
    torch's stages defer their gradient reduction to the end of the step) in PipelineStages
    and a schedule.

    n_microbatches: this DP rank's micro-batches per optimizer step; tokens_per_step: tokens of
    the whole global batch (the LM loss's divisor); seq_len: the tokens per sequence a stage
    sees (after CP splitting); activation_dtype: dtype of the hidden states between stages
    (default: the stage parameters' dtype); cross_entropy_sum: sum-CE of (logits, targets),
    e.g. the parallel context's vocab-parallel one; sequence_shards: ranks splitting the hidden
    states between stages along the sequence (TP's sequence parallelism: each rank sends its
    [mb, seq_len / tp, D] shard, see `apply_tensor_parallel`).
    """
    num_stages = stage_modules[0].num_stages
    pp = dist.get_world_size(group) if dist.is_initialized() else 1
    validate_pipeline(schedule, pp, len(stage_modules), n_microbatches)
    cls, multi = SCHEDULES[schedule]

    stages = []
    for sm in stage_modules:
        kwargs = {}
        if static_shapes:
            kwargs["input_args"], kwargs["output_args"] = _boundary_examples(
                sm, micro_batch_size, seq_len, model_cfg, activation_dtype, sequence_shards)
            if not sm.is_last:  # a wrong declaration would garble the activations sent
                sm.module.register_forward_hook(_boundary_check(kwargs["output_args"]))
        stages.append(
            _MoEAwareStage(sm.module, sm.index, num_stages, device, group=group, **kwargs))
    loss = PipelineLoss(tokens_per_step, cross_entropy_sum)
    stage_arg = stages if multi else stages[0]
    sched = cls(stage_arg, n_microbatches=n_microbatches, loss_fn=loss, scale_grads=False)
    recorder = MoEStatsRecorder([sm.module for sm in stage_modules], model_cfg)
    return Pipeline(sched, stages, stage_modules, RankModel(stage_modules), loss, recorder, group,
                    n_microbatches)


def _boundary_examples(sm: StageModule, mb: int, seq_len: int, model_cfg,
                       dtype: Optional[torch.dtype], sequence_shards: int = 1):
    """Meta tensors of a stage's input and output (what torch would infer by a forward)."""
    if dtype is None:
        dtype = next(sm.module.parameters()).dtype
    hidden = torch.empty(mb, seq_len // sequence_shards, model_cfg.d_model, dtype=dtype,
                         device="meta", requires_grad=True)
    if sm.is_first:
        inputs = torch.empty(mb, seq_len, dtype=torch.long, device="meta")
    else:
        inputs = hidden
    if sm.is_last:
        outputs = torch.empty(mb, seq_len, model_cfg.vocab_size, dtype=dtype, device="meta",
                              requires_grad=True)
    else:
        outputs = hidden
    return inputs, outputs


def _boundary_check(expected: torch.Tensor):
    """Forward hook: the stage's output is what its PipelineStage declared to send."""
    def check(module: nn.Module, args, output) -> None:
        if isinstance(output, DTensor):
            raise RuntimeError("a stage returned a DTensor: hand the next stage the local "
                               "shard (apply_tensor_parallel does for pipeline stages) or "
                               "build the pipeline with static_shapes=False")
        if output.shape != expected.shape or output.dtype != expected.dtype:
            raise RuntimeError(
                f"stage output {tuple(output.shape)} {output.dtype} is not the declared "
                f"{tuple(expected.shape)} {expected.dtype}: check micro_batch_size, seq_len and "
                "activation_dtype, or use static_shapes=False")
    return check


# --------------------------------------------------------------------------------- one step

def _step_args(pipe: Pipeline, inputs, targets, positions):
    args = (inputs,) if pipe.is_first else ()
    target = targets if pipe.is_last else None
    if pipe.is_first and inputs is None:
        raise ValueError("the first stage needs the step's input token ids")
    if pipe.is_last and targets is None:
        raise ValueError("the last stage needs the step's target token ids")
    kwargs = {}
    if positions is not None:
        if positions.dim() == 1:  # one row for every micro-batch; each gets [1, S]
            positions = positions.unsqueeze(0).expand(pipe.n_microbatches, -1)
        kwargs["positions"] = positions
    return args, target, kwargs


def pipeline_train_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward and backward of all this DP rank's micro-batches of one optimizer step.

    inputs / targets: [n_microbatches * micro_batch, S] token ids (the micro-batches stacked in
    order), needed on the first / last stage (may be None elsewhere). positions: None (0..S-1),
    [S], or [n_microbatches * micro_batch, S], on every stage. Gradients accumulate into the
    stage parameters' .grad (zero them before; set the MoE aux-loss scale and reset the global
    LBL counts before, as without PP). Returns the fp64 sum of the LM cross-entropy over this
    rank's tokens on the last stage, None elsewhere (`reduce_over_pp` makes it every rank's).
    Then `pipe.moe_stats.gather(...)` has the routing statistics of the step.
    """
    pipe.loss.sums.clear()
    pipe.moe_stats.reset()
    args, target, kwargs = _step_args(pipe, inputs, targets, positions)
    pipe.schedule.step(*args, target=target, return_outputs=False, **kwargs)
    return pipe.loss.total() if pipe.is_last else None


@torch.no_grad()
def pipeline_eval_step(
    pipe: Pipeline,
    inputs: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    *,
    positions: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward only (modules in eval mode); the LM cross-entropy sum on the last stage."""
    pipe.loss.sums.clear()
    args, target, kwargs = _step_args(pipe, inputs, targets, positions)
    pipe.schedule.eval(*args, target=target, **kwargs)
    return pipe.loss.total() if pipe.is_last else None


def reduce_over_pp(value: Optional[torch.Tensor], pipe: Pipeline) -> torch.Tensor:
    """A value only the last stage has (the loss sum): on every rank of the pp group."""
    if value is None:
        value = torch.zeros((), dtype=torch.float64)
    if pipe.group is None or dist.get_world_size(pipe.group) == 1:
        return value
    device = _group_device(pipe.group)
    out = value.to(device).clone()
    dist.all_reduce(out, group=pipe.group)
    return out


__all__ = [
    "SCHEDULES", "MoEStatsRecorder", "Pipeline", "PipelineLoss", "RankModel", "StageCosts",
    "StageModule",
    "build_pipeline", "build_stage_modules", "estimate_costs", "pipeline_eval_step",
    "pipeline_train_step", "reduce_over_pp", "split_layers", "stage_indices",
]
