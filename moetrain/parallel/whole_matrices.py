"""Whole matrices from shards: gather each matrix of a set of sharded parameters on one owner
rank, apply a function to the whole matrix there, and scatter the result back as the shards.

    exchange = MatrixExchange([(name, param), ...])      # collective, once (builds the plan)
    outs = exchange.apply([local_in, ...], fn)           # collective, every step
    shard_indices(param)                                 # this rank's global indices per dim

Newton-Schulz (moetrain/optim/muon.py) must see whole matrices, whatever shards them: FSDP,
TP, ETP, EP, folded layouts, replicas (docs/optimizers.md, "Whole matrices on every layout").
Nothing here knows a layout: a parameter is a plain tensor (whole on this rank) or a DTensor,
and its mesh and placements (`Shard`, FSDP2's `_StridedShard`, `Replicate`) say which global
indices every rank holds. A 2-D parameter is one matrix; a 3-D one [E, m, n] is E matrices
(an expert stack: EP holds whole experts in dim 0, FSDP and ETP may cut any dim).

The plan (built once, identical on every rank of a group):
- each rank's indices per dim, from DTensor's own splitting (`distribute_tensor` of an arange
  per dim, no communication), gathered over the ranks holding any of the parameters;
- the ranks whose coordinates on a parameter's `Replicate` mesh dims are equal form one copy
  of it (a "slice"); each slice orthogonalises its copy itself, so replicas exchange nothing;
- every matrix of every slice gets one owner among the slice's ranks that hold a piece of it,
  longest-processing-time first: matrices by decreasing cost (Newton-Schulz is
  ~ m n min(m, n)), each to the candidate with the least cost so far (then the one holding
  the most of it, then the lowest rank) - an expert whole on one rank stays there;
- per step: one all-to-all sends every piece to its owner, the owner assembles and applies
  `fn`, one all-to-all sends every piece of the result back. Both carry the caller's dtype
  (bf16 for Muon). Matrices go in rounds of at most `round_elements` elements, so the
  gathered matrices never hold more than one round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

try:  # FSDP2's placement for a dim sharded right-to-left (FSDP over a TP/EP-sharded dim)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - every torch moetrain supports has it
    _StridedShard = None

# The global indices a rank holds along one dim: a range when contiguous (every layout
# moetrain builds), else the explicit ascending-or-not list DTensor gives.
Indices = Union[range, tuple[int, ...]]


def _project(placement, dim: int):
    """`placement` as it acts on tensor dim `dim` alone, for a 1-D tensor of that dim."""
    if placement.is_replicate():
        return Replicate()
    if placement.is_partial():
        raise ValueError(f"{placement}: a parameter cannot be a pending sum (Partial)")
    if getattr(placement, "dim", None) != dim:
        return Replicate()
    if _StridedShard is not None and isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(0)
    raise ValueError(f"unsupported placement {placement!r}")


def _as_indices(values: list[int]) -> Indices:
    if values and values == list(range(values[0], values[0] + len(values))):
        return range(values[0], values[0] + len(values))
    return range(0) if not values else tuple(values)


def shard_indices(param: torch.Tensor) -> list[Indices]:
    """This rank's global indices of `param` per tensor dim (its local tensor is the global
    tensor at their Cartesian product, in this order). DTensor's own splitting of a 1-D
    arange per dim, no communication; a plain tensor is whole."""
    if not isinstance(param, DTensor):
        return [range(n) for n in param.shape]
    out = []
    for d, n in enumerate(param.shape):
        placements = [_project(p, d) for p in param.placements]
        if all(p.is_replicate() for p in placements):
            out.append(range(n))
            continue
        ids = distribute_tensor(torch.arange(n), param.device_mesh, placements,
                                src_data_rank=None).to_local()
        out.append(_as_indices(ids.tolist()))
    return out


def _slice_ranks(param: torch.Tensor, rank: int) -> tuple[int, ...]:
    """The global ranks holding one whole copy of `param` together with this rank: those of
    its mesh whose coordinates on the Replicate mesh dims are this rank's (a plain tensor:
    this rank alone)."""
    if not isinstance(param, DTensor):
        return (rank,)
    mesh = param.device_mesh
    coord = mesh.get_coordinate()
    index = tuple(coord[i] if p.is_replicate() else slice(None)
                  for i, p in enumerate(param.placements))
    return tuple(sorted(mesh.mesh[index].flatten().tolist()))


def _mesh_ranks(param: torch.Tensor, rank: int) -> tuple[int, ...]:
    if not isinstance(param, DTensor):
        return (rank,)
    return tuple(sorted(param.device_mesh.mesh.flatten().tolist()))


@dataclass(frozen=True)
class _Info:
    """What one rank holds of one parameter (gathered over the group)."""

    shape: tuple[int, ...]
    slice_ranks: tuple[int, ...]
    indices: tuple[Indices, ...]


@dataclass
class _Piece:
    """A rank's piece of one matrix: rows x cols of the whole matrix."""

    rank: int
    rows: Indices
    cols: Indices

    @property
    def numel(self) -> int:
        return len(self.rows) * len(self.cols)


@dataclass
class _Matrix:
    """One matrix of one slice: parameter `name`, index `e` in dim 0 of a 3-D parameter (None:
    a 2-D parameter), its shape, the pieces of the slice's ranks and its owner."""

    name: str
    e: Optional[int]
    shape: tuple[int, int]
    pieces: list[_Piece]
    owner: int = -1

    @property
    def cost(self) -> int:  # Newton-Schulz work ~ m n min(m, n)
        m, n = self.shape
        return m * n * min(m, n)


@dataclass
class _Round:
    """One round's sends (to owners) and owned matrices, in the canonical order."""

    # per peer (group rank order): (param position, local dim-0 index or None) pieces sent
    send: list[list[tuple[int, Optional[int]]]] = field(default_factory=list)
    send_sizes: list[int] = field(default_factory=list)
    owned: list[_Matrix] = field(default_factory=list)
    recv_sizes: list[int] = field(default_factory=list)  # pieces of owned matrices, per peer
    local: list[tuple[int, Optional[int]]] = field(default_factory=list)  # whole here, no copy


class MatrixExchange:
    """Gather / apply / scatter of whole matrices for a fixed set of parameters (module
    docstring). `params`: (name, parameter) pairs, names unique and the same on every rank
    holding a parameter; 2-D parameters are one matrix, 3-D ones a stack over dim 0.

    Construction is collective over the default group (every rank calls it, in the same order
    relative to other collectives): one all-gather of each rank's ranks, a process group per
    set of ranks sharing parameters, one all-gather of the shard indices inside it. Raises
    ValueError for a parameter that is not 2-D or 3-D or a layout it cannot cover.
    """

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]],
                 round_elements: int = 2 ** 28) -> None:
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        for name, p in params:
            if p.ndim not in (2, 3):
                raise ValueError(f"{name}: {p.ndim}-D; whole matrices are 2-D, or a 3-D stack")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if distributed else 0
        self.indices = [tuple(shard_indices(p)) for p in self.params]
        infos = {name: _Info(tuple(p.shape), _slice_ranks(p, self.rank), ix)
                 for (name, p), ix in zip(params, self.indices)}
        members = sorted({r for p in self.params for r in _mesh_ranks(p, self.rank)} | {self.rank})
        self.group: Optional[dist.ProcessGroup] = None
        self.group_ranks = [self.rank]
        tables = {self.rank: infos}
        if distributed:
            self.group, self.group_ranks = _group_of(members, self.rank)
            if len(self.group_ranks) > 1:
                gathered: list = [None] * len(self.group_ranks)
                dist.all_gather_object(gathered, infos, group=self.group)
                tables = dict(zip(self.group_ranks, gathered))
        self.matrices = _assign(_matrices(tables))
        self.position = {name: i for i, name in enumerate(self.names)}
        self.rounds = self._rounds(round_elements)
        # Whether any piece travels: the same answer on every rank of the group.
        self.communicates = any(piece.rank != m.owner for m in self.matrices for piece in m.pieces)

    # ------------------------------------------------------------------ plan
    def _rounds(self, round_elements: int) -> list[_Round]:
        """Split the matrices (canonical order: by name, then e) into rounds of whole
        parameters of at most `round_elements` elements (global sizes: the same rounds on
        every rank), and list this rank's part."""
        peers = {r: i for i, r in enumerate(self.group_ranks)}
        by_name: dict[str, list[_Matrix]] = {}
        for m in self.matrices:
            by_name.setdefault(m.name, []).append(m)
        rounds, current, size = [], [], 0
        for name in sorted(by_name):
            n = sum(math.prod(m.shape) for m in by_name[name])
            if current and size + n > round_elements:
                rounds.append(current)
                current, size = [], 0
            current.extend(by_name[name])
            size += n
        if current:
            rounds.append(current)
        out = []
        for matrices in rounds or [[]]:
            r = _Round(send=[[] for _ in peers], send_sizes=[0] * len(peers),
                       recv_sizes=[0] * len(peers))
            for m in matrices:
                mine = [piece for piece in m.pieces if piece.rank == self.rank and piece.numel]
                if m.owner == self.rank and mine and len(m.pieces) == 1 and _whole(mine[0], m):
                    r.local.append(self._where(m))  # nothing to gather nor scatter
                    continue
                for piece in mine:
                    r.send[peers[m.owner]].append(self._where(m))
                    r.send_sizes[peers[m.owner]] += piece.numel
                if m.owner == self.rank:
                    r.owned.append(m)
                    for piece in m.pieces:
                        r.recv_sizes[peers[piece.rank]] += piece.numel
            out.append(r)
        return out

    def _where(self, m: _Matrix) -> tuple[int, Optional[int]]:
        """(position of the parameter, index of matrix e in this rank's local dim 0)."""
        i = self.position[m.name]
        if m.e is None:
            return i, None
        return i, self.indices[i][0].index(m.e)

    def owned_cost(self) -> int:
        """This rank's Newton-Schulz cost units (sum of m n min(m, n) of what it owns)."""
        return sum(m.cost for m in self.matrices if m.owner == self.rank)

    def bytes_per_apply(self, element_size: int) -> dict[str, int]:
        """Bytes this rank sends and receives in one `apply` (both directions together),
        pieces it keeps for itself excluded."""
        sent = recv = 0
        me = self.group_ranks.index(self.rank)
        for r in self.rounds:
            sent += sum(s for i, s in enumerate(r.send_sizes) if i != me)
            recv += sum(s for i, s in enumerate(r.recv_sizes) if i != me)
        # the scatter mirrors the gather: an owner sends back what it received, and vice versa
        total = (sent + recv) * element_size
        return {"sent": total, "received": total}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def apply(self, inputs: Sequence[torch.Tensor],
              fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """fn(whole matrix) for every matrix, returned as this rank's pieces.

        inputs[i]: this rank's local tensor of parameter i (its local shape, any dtype: what
        travels). Returns tensors of the same local shapes and dtype holding fn's result at
        this rank's indices. `fn` takes and returns a 2-D [m, n] tensor (any strides).
        Collective over the group when pieces travel; no host read."""
        outs = [torch.empty_like(x) for x in inputs]
        if not inputs:
            return outs
        for r in self.rounds:
            for i, e in r.local:
                outs[i][_at(e)].copy_(fn(inputs[i][_at(e)]))
            if not self.communicates:
                continue
            dtype, device = inputs[0].dtype, inputs[0].device
            send = [inputs[i][_at(e)].reshape(-1) for peer in r.send for i, e in peer]
            send_buf = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
            recv_buf = send_buf.new_empty(sum(r.recv_sizes))
            dist.all_to_all_single(recv_buf, send_buf, r.recv_sizes, r.send_sizes,
                                   group=self.group)
            # assemble, apply, cut: pieces arrive by peer, within a peer in canonical order
            back = [[] for _ in self.group_ranks]
            offsets = _peer_offsets(r.recv_sizes)
            results = []
            peers = {q: k for k, q in enumerate(self.group_ranks)}
            for m in r.owned:
                whole = recv_buf.new_empty(m.shape)
                for piece in m.pieces:
                    k = peers[piece.rank]
                    flat = recv_buf[offsets[k]:offsets[k] + piece.numel]
                    offsets[k] += piece.numel
                    _put(whole, piece, flat.view(len(piece.rows), len(piece.cols)))
                results.append((m, fn(whole)))
            for m, result in results:
                for piece in m.pieces:
                    back[peers[piece.rank]].append(_take(result, piece).reshape(-1))
            send_back = torch.cat([t for peer in back for t in peer]) if results else \
                send_buf.new_empty(0)
            recv_back = send_buf.new_empty(sum(r.send_sizes))
            dist.all_to_all_single(recv_back, send_back.to(dtype), r.send_sizes, r.recv_sizes,
                                   group=self.group)
            offset = 0
            for peer in r.send:
                for i, e in peer:
                    target = outs[i][_at(e)]
                    target.copy_(recv_back[offset:offset + target.numel()].view_as(target))
                    offset += target.numel()
        return outs


def _at(e: Optional[int]):
    return (Ellipsis,) if e is None else (e,)


def _peer_offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _index(ix: Indices, device) -> Union[slice, torch.Tensor]:
    if isinstance(ix, range):
        return slice(ix.start, ix.stop)
    return torch.tensor(ix, device=device)


def _put(whole: torch.Tensor, piece: _Piece, values: torch.Tensor) -> None:
    rows, cols = _index(piece.rows, whole.device), _index(piece.cols, whole.device)
    if isinstance(rows, slice) and isinstance(cols, slice):
        whole[rows, cols] = values
    else:
        whole[_grid(rows, cols, whole)] = values


def _take(whole: torch.Tensor, piece: _Piece) -> torch.Tensor:
    rows, cols = _index(piece.rows, whole.device), _index(piece.cols, whole.device)
    if isinstance(rows, slice) and isinstance(cols, slice):
        return whole[rows, cols]
    return whole[_grid(rows, cols, whole)]


def _grid(rows, cols, whole: torch.Tensor):
    def ids(ix, n):
        return torch.arange(n, device=whole.device)[ix] if isinstance(ix, slice) else ix
    r, c = ids(rows, whole.shape[0]), ids(cols, whole.shape[1])
    return r[:, None], c[None, :]


def _whole(piece: _Piece, m: _Matrix) -> bool:
    return piece.rows == range(m.shape[0]) and piece.cols == range(m.shape[1])


def _matrices(tables: dict[int, dict[str, _Info]]) -> list[_Matrix]:
    """Every matrix of every slice, with its pieces; checks that each slice covers it once."""
    names = sorted({name for infos in tables.values() for name in infos})
    out = []
    for name in names:
        holders = {rank: infos[name] for rank, infos in tables.items() if name in infos}
        shapes = {info.shape for info in holders.values()}
        if len(shapes) != 1:
            raise ValueError(f"{name}: ranks disagree on its shape: {sorted(shapes)}")
        (shape,) = shapes
        slices = sorted({info.slice_ranks for info in holders.values()})
        stack = len(shape) == 3
        count = shape[0] if stack else 1
        mat_shape = shape[-2:]
        for ranks in slices:
            missing = [r for r in ranks if r not in holders]
            if missing:
                raise ValueError(f"{name}: ranks {missing} of a copy hold no piece of it")
            for e in range(count):
                pieces = []
                for r in ranks:
                    ix = holders[r].indices
                    if stack and e not in ix[0]:
                        continue
                    rows, cols = (ix[1], ix[2]) if stack else (ix[0], ix[1])
                    if len(rows) and len(cols):
                        pieces.append(_Piece(r, rows, cols))
                if sum(p.numel for p in pieces) != math.prod(mat_shape):
                    raise ValueError(
                        f"{name}: the shards of ranks {list(ranks)} do not cover matrix "
                        f"{e if stack else ''} exactly once (pieces {[(p.rank, p.rows, p.cols) for p in pieces]})")
                out.append(_Matrix(name, e if stack else None, tuple(mat_shape), pieces))
    return out


def _assign(matrices: list[_Matrix]) -> list[_Matrix]:
    """Owners, longest processing time first (module docstring); deterministic."""
    load: dict[int, int] = {}
    for m in sorted(matrices, key=lambda m: (-m.cost, m.name, -1 if m.e is None else m.e,
                                             m.pieces[0].rank)):
        best = min(m.pieces, key=lambda p: (load.get(p.rank, 0), -p.numel, p.rank))
        m.owner = best.rank
        load[best.rank] = load.get(best.rank, 0) + m.cost
    return matrices


def _group_of(members: list[int], rank: int) -> tuple[Optional[dist.ProcessGroup], list[int]]:
    """The process group of the ranks sharing parameters with this rank (a pipeline stage):
    every rank's set is gathered and a group made for each distinct one, by every rank in
    the same order (new_group is collective over the default group)."""
    world = dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, tuple(members))
    for r, ranks in enumerate(everyone):
        for q in ranks:
            if everyone[q] != ranks:
                raise ValueError(
                    f"rank {r} shares parameters with ranks {list(ranks)} but rank {q} with "
                    f"{list(everyone[q])}: the parameter meshes do not split the ranks into groups")
    mine = None
    for ranks in sorted(set(everyone)):
        if len(ranks) == 1:
            continue
        group = None if len(ranks) == world else dist.new_group(list(ranks))
        if rank in ranks:
            mine = group
    return mine, list(everyone[rank])


__all__ = ["MatrixExchange", "shard_indices"]
