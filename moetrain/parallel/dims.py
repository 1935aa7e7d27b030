"""The five-dimensional layout: degrees, validation and rank groups, without torch.distributed.

Every rank sits in two views of the same world (DESIGN §2):

- dense (attention, embeddings, dense MLPs): W = PP x DP x CP x TP, rank order tp-cp-dp-pp;
- MoE (routed experts):                      W = PP x EDP x EP x ETP, rank order etp-ep-edp-pp;

where the first name varies fastest, as in Megatron-Core, so that moetrain's groups equal
Megatron-Core's `RankGenerator` groups for the same sizes. EP may span ranks that are DP, CP or
TP ranks in the dense view ("MoE parallel folding"); only PP is shared by both views.

Nothing here imports torch: the layout can be checked and printed (`python -m moetrain.layout`)
before any process exists. `moetrain.parallel.mesh` turns it into `DeviceMesh` views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

#: Every group kind `ParallelDims.groups()` returns, in a fixed order.
GROUP_KINDS = ("tp", "cp", "dp", "pp", "dp_cp", "cp_tp", "dp_cp_tp", "ep", "etp", "edp")

# Each group kind: (view, the view's dims it spans). A view lists its dims fastest-varying first.
_DENSE_VIEW = ("tp", "cp", "dp", "pp")
_MOE_VIEW = ("etp", "ep", "edp", "pp")
_GROUP_SPANS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tp": (_DENSE_VIEW, ("tp",)),
    "cp": (_DENSE_VIEW, ("cp",)),
    "dp": (_DENSE_VIEW, ("dp",)),
    "pp": (_DENSE_VIEW, ("pp",)),
    # Dense gradients are reduced over DP x CP; cp varies fastest inside the group.
    "dp_cp": (_DENSE_VIEW, ("cp", "dp")),
    # The ranks sharing one micro-batch (CP splits its sequences, TP's sequence parallelism
    # splits them further): micro/seq-scope load-balancing counts are summed over this group.
    "cp_tp": (_DENSE_VIEW, ("tp", "cp")),
    # Every rank of a pipeline stage: with sequence parallelism each holds different tokens, so
    # router statistics and router / shared-expert gradients are summed over this group.
    "dp_cp_tp": (_DENSE_VIEW, ("tp", "cp", "dp")),
    "ep": (_MOE_VIEW, ("ep",)),
    "etp": (_MOE_VIEW, ("etp",)),
    "edp": (_MOE_VIEW, ("edp",)),
}


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message is one line naming the keys and values."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        #: The config keys the failed constraint involves, e.g. ("parallel.tp", "model.n_heads").
        self.keys = keys


class DenseCoord(NamedTuple):
    """A rank's coordinates in the dense view, outermost first (the dense mesh's dim order)."""

    pp: int
    dp: int
    cp: int
    tp: int


class MoECoord(NamedTuple):
    """A rank's coordinates in the MoE view, outermost first (the MoE mesh's dim order)."""

    pp: int
    edp: int
    ep: int
    etp: int


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of one run; `dp` and `edp` are derived from the world size.

    `ParallelDims(8, tp=2, ep=4)` or `ParallelDims.from_config(cfg.parallel, world_size)`;
    construction validates (LayoutError), so an existing instance is always a valid layout.
    """

    world_size: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, parallel: Any, world_size: int) -> ParallelDims:
        """From a `ParallelConfig` (or anything with attributes tp, cp, pp, ep, etp, vpp)."""
        return cls(
            world_size,
            tp=parallel.tp,
            cp=parallel.cp,
            pp=parallel.pp,
            ep=parallel.ep,
            etp=parallel.etp,
            vpp=parallel.vpp,
        )

    # -- derived degrees ---------------------------------------------------------------------

    @property
    def dp(self) -> int:
        """Data-parallel degree of the dense view: W / (tp * cp * pp)."""
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree of the MoE view: W / (etp * ep * pp)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def dp_cp(self) -> int:
        """Size of the dense gradient-reduction group (DP x CP)."""
        return self.dp * self.cp

    @property
    def cp_tp(self) -> int:
        """Size of the group of ranks sharing one micro-batch (CP x TP)."""
        return self.cp * self.tp

    @property
    def dp_cp_tp(self) -> int:
        """Size of the group of all ranks of a pipeline stage (DP x CP x TP)."""
        return self.dp * self.cp * self.tp

    def size(self, kind: str) -> int:
        """Size of a group of the given kind (one of GROUP_KINDS)."""
        if kind not in _GROUP_SPANS:
            raise KeyError(f"unknown group kind {kind!r}; known: {', '.join(GROUP_KINDS)}")
        return getattr(self, kind)

    @property
    def dense_shape(self) -> tuple[int, int, int, int]:
        """(pp, dp, cp, tp): the dense mesh's shape, outermost first."""
        return (self.pp, self.dp, self.cp, self.tp)

    @property
    def moe_shape(self) -> tuple[int, int, int, int]:
        """(pp, edp, ep, etp): the MoE mesh's shape, outermost first."""
        return (self.pp, self.edp, self.ep, self.etp)

    # -- validation --------------------------------------------------------------------------

    def validate(self) -> None:
        """Check the degrees against the world size; raise LayoutError on the first failure.

        Called on construction; model-dependent checks are in `validate_model_fit`.
        """
        if not _positive_int(self.world_size):
            raise LayoutError(
                f"the world size must be a positive integer, got {self.world_size!r}",
                ("world_size",),
            )
        for key in ("tp", "cp", "pp", "ep", "etp", "vpp"):
            value = getattr(self, key)
            if not _positive_int(value):
                raise LayoutError(
                    f"parallel.{key} must be a positive integer, got {value!r}",
                    (f"parallel.{key}",),
                )
        dense = self.tp * self.cp * self.pp
        if self.world_size % dense:
            raise LayoutError(
                f"parallel.tp*parallel.cp*parallel.pp = {self.tp}*{self.cp}*{self.pp} = {dense} "
                f"does not divide the world size {self.world_size}",
                ("parallel.tp", "parallel.cp", "parallel.pp"),
            )
        moe = self.etp * self.ep * self.pp
        if self.world_size % moe:
            raise LayoutError(
                f"parallel.etp*parallel.ep*parallel.pp = {self.etp}*{self.ep}*{self.pp} = {moe} "
                f"does not divide the world size {self.world_size}",
                ("parallel.etp", "parallel.ep", "parallel.pp"),
            )
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(
                f"parallel.vpp = {self.vpp} (virtual pipeline stages) needs parallel.pp > 1",
                ("parallel.vpp", "parallel.pp"),
            )

    # -- rank groups -------------------------------------------------------------------------

    def groups(self) -> dict[str, list[list[int]]]:
        """Every group of every kind in GROUP_KINDS, as lists of ascending global ranks.

        Groups are listed with the remaining dims' index varying fastest-first, as Megatron-Core
        lists them; each group's ranks are ordered by the group-local rank.
        """
        return {kind: self.groups_of(kind) for kind in GROUP_KINDS}

    def groups_of(self, kind: str) -> list[list[int]]:
        """All groups of one kind (one of GROUP_KINDS)."""
        if kind not in _GROUP_SPANS:
            raise KeyError(f"unknown group kind {kind!r}; known: {', '.join(GROUP_KINDS)}")
        view, members = _GROUP_SPANS[kind]
        sizes = [getattr(self, name) for name in view]
        strides = _strides(sizes)
        inside = [i for i, name in enumerate(view) if name in members]
        outside = [i for i, name in enumerate(view) if name not in members]
        offsets = _offsets(sizes, strides, inside)
        return [[base + off for off in offsets] for base in _offsets(sizes, strides, outside)]

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The group of the given kind that contains `rank`."""
        self._check_rank(rank)
        for group in self.groups_of(kind):
            if rank in group:
                return group
        raise AssertionError("unreachable: the groups of a kind partition the world")

    # -- coordinates -------------------------------------------------------------------------

    def dense_coord(self, rank: int) -> DenseCoord:
        """(pp, dp, cp, tp) of `rank`: rank = tp + tp*(cp + cp_size*(dp + dp_size*pp))."""
        self._check_rank(rank)
        tp, cp, dp, pp = _decompose(rank, [self.tp, self.cp, self.dp, self.pp])
        return DenseCoord(pp=pp, dp=dp, cp=cp, tp=tp)

    def moe_coord(self, rank: int) -> MoECoord:
        """(pp, edp, ep, etp) of `rank`: rank = etp + etp_size*(ep + ep_size*(edp + ...pp))."""
        self._check_rank(rank)
        etp, ep, edp, pp = _decompose(rank, [self.etp, self.ep, self.edp, self.pp])
        return MoECoord(pp=pp, edp=edp, ep=ep, etp=etp)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of size {self.world_size}")

    def __str__(self) -> str:
        return (
            f"world {self.world_size}: dense pp{self.pp} x dp{self.dp} x cp{self.cp} x tp{self.tp}"
            f", MoE pp{self.pp} x edp{self.edp} x ep{self.ep} x etp{self.etp}, vpp{self.vpp}"
        )


def _positive_int(value: Any) -> bool:
    # bool is an int subclass; `parallel.tp=true` is a typo, not a degree.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _strides(sizes: list[int]) -> list[int]:
    strides, step = [], 1
    for size in sizes:
        strides.append(step)
        step *= size
    return strides


def _offsets(sizes: list[int], strides: list[int], dims: list[int]) -> list[int]:
    """All rank offsets spanned by `dims`, the first of `dims` varying fastest."""
    offsets = [0]
    for i in dims:
        offsets = [off + c * strides[i] for c in range(sizes[i]) for off in offsets]
    return offsets


def _decompose(rank: int, sizes: list[int]) -> list[int]:
    """Mixed-radix digits of `rank`, fastest-varying first."""
    digits = []
    for size in sizes:
        digits.append(rank % size)
        rank //= size
    return digits


def validate_model_fit(
    dims: ParallelDims,
    model: Any,
    train: Any,
    seq_len: int,
    *,
    replicate_kv_heads: bool = False,
    pp_schedule: str | None = None,
) -> None:
    """Check that a model and batch shape split over `dims`; raise LayoutError on the first misfit.

    `model` is a `ModelConfig`, `train` a `TrainConfig` (anything with the same attributes);
    `seq_len` is `data.seq_len`. With `replicate_kv_heads`, n_kv_heads < tp is accepted when
    tp % n_kv_heads == 0 (each KV head is replicated over tp / n_kv_heads TP ranks). With
    `pp_schedule` (`parallel.pp_schedule`), the pipeline schedule is checked too
    (`validate_pipeline`).
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
    kv_ok = model.n_kv_heads % dims.tp == 0 or (
        replicate_kv_heads and dims.tp % model.n_kv_heads == 0
    )
    if not kv_ok:
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
    stages = dims.pp * dims.vpp
    if model.n_layers % stages:
        raise LayoutError(
            f"model.n_layers = {model.n_layers} is not divisible by "
            f"parallel.pp*parallel.vpp = {dims.pp}*{dims.vpp} = {stages}",
            ("model.n_layers", "parallel.pp", "parallel.vpp"),
        )
    per_step = train.micro_batch_size * dims.dp
    if train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size = {train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*dp = {train.micro_batch_size}*{dims.dp} = {per_step} "
            f"(dp = world size {dims.world_size} / (parallel.tp*parallel.cp*parallel.pp))",
            ("train.global_batch_size", "train.micro_batch_size"),
        )
    if pp_schedule is not None:
        validate_pipeline(pp_schedule, dims.pp, dims.vpp, train.global_batch_size // per_step,
                          tie_embeddings=bool(getattr(model, "tie_embeddings", False)))


#: parallel.pp_schedule -> whether the schedule runs several (virtual) stages per rank.
PP_SCHEDULES = {"gpipe": False, "1f1b": False, "interleaved": True, "zero_bubble": True}


def validate_pipeline(
    schedule: str, pp: int, vpp: int, n_microbatches: int, *, tie_embeddings: bool = False
) -> None:
    """Check a pipeline schedule against pp, vpp and the micro-batches per data-parallel rank
    and step (train.global_batch_size / (train.micro_batch_size * dp)); LayoutError naming the
    keys. Everything passes for pp = 1. `moetrain.parallel.pipeline.build_pipeline` runs the
    same checks."""
    if schedule not in PP_SCHEDULES:
        raise LayoutError(
            f"parallel.pp_schedule = {schedule!r}; use one of {', '.join(PP_SCHEDULES)}",
            ("parallel.pp_schedule",))
    if pp * vpp == 1:
        return
    if tie_embeddings:
        raise LayoutError(
            "model.tie_embeddings = true is not supported with pipeline parallelism "
            f"(parallel.pp*parallel.vpp = {pp}*{vpp}): the embedding and the output head sit "
            "on different stages; untie them", ("model.tie_embeddings", "parallel.pp"))
    if not PP_SCHEDULES[schedule] and vpp != 1:
        raise LayoutError(
            f"parallel.pp_schedule = {schedule} runs one stage per rank, but parallel.vpp = {vpp}; "
            "use interleaved or zero_bubble", ("parallel.pp_schedule", "parallel.vpp"))
    if schedule == "1f1b" and n_microbatches < pp:
        raise LayoutError(
            f"parallel.pp_schedule = 1f1b needs at least parallel.pp = {pp} micro-batches "
            f"per data-parallel rank, got {n_microbatches} (train.global_batch_size / "
            "(train.micro_batch_size * dp))",
            ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"))
    rounds = max(1, n_microbatches // pp)
    if PP_SCHEDULES[schedule] and n_microbatches % rounds:
        raise LayoutError(
            f"parallel.pp_schedule = {schedule} needs the micro-batches per data-parallel rank "
            f"({n_microbatches}) to be a multiple of max(1, micro-batches // parallel.pp) = "
            f"{rounds}",
            ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"))


def validate_layout(cfg: Any, world_size: int) -> ParallelDims:
    """Validate a whole `MoetrainConfig` (parallel, model, train, data) for a world size.

    Returns the `ParallelDims`; raises LayoutError naming the keys on the first failure.
    """
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    validate_model_fit(dims, cfg.model, cfg.train, cfg.data.seq_len,
                       pp_schedule=cfg.parallel.pp_schedule)
    return dims
