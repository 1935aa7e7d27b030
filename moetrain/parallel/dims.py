"""The five-dimensional layout: degrees and rank groups, pure arithmetic (no torch).

Every rank sits in two views of the same world (docs/design.md, "Parallel layout"):

- dense (attention, embeddings, dense MLPs): W = PP x DP x CP x TP, rank order tp-cp-dp-pp;
- MoE (routed experts):                      W = PP x EDP x EP x ETP, rank order etp-ep-edp-pp;

where the first name varies fastest, as in Megatron-Core, so that moetrain's groups equal
Megatron-Core's `RankGenerator` groups for the same sizes. EP may span ranks that are DP, CP or
TP ranks in the dense view ("MoE parallel folding"); only PP is shared by both views.

Nothing here imports torch: the layout can be printed (`python -m moetrain.layout`) before any
process exists. `moetrain.parallel.checks` checks a config against it; `moetrain.parallel.mesh`
turns it into `DeviceMesh` views.
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

        Called on construction; the model and batch checks are `moetrain.parallel.checks`.
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
        """The group of the given kind that contains `rank` (in `groups_of`'s order), from the
        rank's coordinates: O(group size), not O(world) (the planner asks it per rank)."""
        self._check_rank(rank)
        if kind not in _GROUP_SPANS:
            raise KeyError(f"unknown group kind {kind!r}; known: {', '.join(GROUP_KINDS)}")
        view, members = _GROUP_SPANS[kind]
        sizes = [getattr(self, name) for name in view]
        strides = _strides(sizes)
        digits = _decompose(rank, sizes)
        base = rank - sum(digits[i] * strides[i] for i, name in enumerate(view) if name in members)
        inside = [i for i, name in enumerate(view) if name in members]
        return [base + off for off in _offsets(sizes, strides, inside)]

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
