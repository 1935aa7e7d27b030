"""Expert parallelism (EP) and expert tensor parallelism (ETP) for the MoE layers.

    apply_expert_parallel(model, experts_mesh, sync_free=False)
        every MoE layer's experts as DTensor shards of the (ep, etp) mesh, rows moved by
        all-to-all: `AllToAllExchange` (exact sizes, read on the host once per layer and
        forward) or, with `sync_free`, `SyncFreeAllToAllExchange` (static budgeted buffers,
        nothing read on the host)

EP rank r holds experts [r E/ep, (r+1) E/ep); ETP rank s holds hidden columns
[s F/etp, (s+1) F/etp) of each. Capacity is decided before the exchange, on each rank's own
tokens. Layout, data flow, capacity, the budget, overlap and ETP rules: docs/expert_parallel.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

from moetrain.model.moe.layer import moe_layers


def all_to_all_rows(
    x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Send rows input_splits[i] (in order) to group rank i; receive output_splits[i] from it.

    Autograd-aware: the backward is the reverse exchange. Every row the synchronous expert path
    moves between ranks goes through this one function (the byte-count test wraps it); the
    overlapped path goes through `start_rows`.
    """
    return funcol.all_to_all_single_autograd(
        x_ND.contiguous(), list(output_splits), list(input_splits), group
    )


# -- asynchronous row all-to-alls (model.moe.ep_overlap) -------------------------------------------
#
# A row all-to-all in flight is two autograd nodes: `_Send` starts it, `_Receive` waits for it.
# Backward mirrors them: `_Receive`'s backward starts the reverse all-to-all of the gradient and
# `_Send`'s backward waits for it, so autograd runs whatever was computed between them in the
# forward (the other piece's experts, the shared experts) while the gradient travels. The
# engine runs ready nodes latest-created first, so that order is the forward's, reversed.
# On CUDA the all-to-all runs on the process group's communication stream: starting it makes that
# stream wait for the work queued so far on the current stream (the rows are ready), and
# Work.wait() makes the current stream wait for the all-to-all's end; the buffers stay referenced
# by the `Flight` until then, so no allocator can reuse them early. Nothing waits on the host.


def _launch(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
            group: dist.ProcessGroup) -> tuple[torch.Tensor, Any]:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits),
                                  group=group, async_op=True)
    return out, work


@dataclass
class Flight:
    """One asynchronous row all-to-all (`send_splits` rows out to each rank, `recv_splits` in)
    and, in backward, its reverse."""

    group: dist.ProcessGroup
    send_splits: list[int]
    recv_splits: list[int]
    pending: Any = None  # (output, work) of the all-to-all in flight, either direction


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, flight: Flight):
        flight.pending = _launch(x, flight.recv_splits, flight.send_splits, flight.group)
        ctx.flight = flight
        return x.new_empty(0)  # links _Receive to this node

    @staticmethod
    def backward(ctx, _):
        out, work = ctx.flight.pending
        ctx.flight.pending = None
        work.wait()
        return out, None


class _Receive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, flight: Flight):
        out, work = flight.pending
        flight.pending = None
        work.wait()
        ctx.flight = flight
        return out

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        f.pending = _launch(grad, f.send_splits, f.recv_splits, f.group)
        return grad.new_empty(0), None


@torch.compiler.disable  # work handles are eager-only; compiled code uses all_to_all_rows
def start_rows(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup) -> tuple[torch.Tensor, Flight]:
    """Start sending rows input_splits[i] to group rank i (receiving output_splits[i]); returns
    the link to pass to `wait_rows` and the flight."""
    flight = Flight(group, list(input_splits), list(output_splits))
    return _Send.apply(x_ND, flight), flight


@torch.compiler.disable
def wait_rows(link: torch.Tensor, flight: Flight) -> torch.Tensor:
    """The rows `start_rows` started, once they have arrived."""
    return _Receive.apply(link, flight)


# torch 2.13 renamed funcol.all_gather_tensor (still there, deprecated); 2.11 has only that name.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


# -- the two all-to-all backends -------------------------------------------------------------------


def _chunk_bounds(num_local: int, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of local experts for `chunks` pieces (fewer with fewer experts)."""
    chunks = max(1, min(chunks, num_local))
    edges = [round(i * num_local / chunks) for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _ranges(starts_J: torch.Tensor, lengths_J: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenation of [starts[j], starts[j] + lengths[j]) over j: [total] int64 (total = the
    lengths' sum, known on the host)."""
    ends = torch.cumsum(lengths_J, 0)
    r = torch.arange(total, device=starts_J.device)
    seg = torch.searchsorted(ends, r, right=True)
    return starts_J[seg] + r - (ends - lengths_J)[seg]


def _expert_major_order(counts_SL: torch.Tensor, total: int) -> Optional[torch.Tensor]:
    """Row order that turns rows grouped (source, local expert) into (local expert, source).

    Rows arrive as S source blocks, each holding L expert chunks of counts_SL[s, l] rows; a
    stable sort on the local expert of each row keeps the source order within an expert.
    """
    S, L = counts_SL.shape
    if S == 1 or L == 1:
        return None
    expert_of_chunk = torch.arange(L, device=counts_SL.device).repeat(S)
    expert_of_row = torch.repeat_interleave(expert_of_chunk, counts_SL.reshape(-1),
                                            output_size=total)
    return torch.argsort(expert_of_row, stable=True)


@dataclass
class _Piece:
    """One piece of an exchange: local experts [lo, hi) of every EP rank."""

    lo: int
    hi: int
    send_splits: list[int]  # rows this rank sends to each EP rank (slot size when sync-free)
    recv_splits: list[int]  # rows it receives from each EP rank
    etp_splits: Optional[list[int]]  # rows each ETP rank adds to the gather; None = no ETP
    order: Optional[torch.Tensor]  # received row feeding expert-major row n; None = identity
    counts: torch.Tensor  # rows per local expert of the piece [hi - lo]
    rows: Optional[torch.Tensor] = None  # rows of the open() input sent (None: the first ones)
    link: Any = None  # what is in flight (a tensor when synchronous; (link, Flight) when not)
    y: Optional[torch.Tensor] = None  # the outputs back (or in flight back)
    extra: dict = field(default_factory=dict)


class _Flow:
    """What both all-to-all flows share: moving a piece's rows (synchronously, or started now and
    waited for at `receive`), the ETP hop, the regrouping by local expert, and the way back."""

    counters: Optional[torch.Tensor] = None

    def __init__(self, exchange: "AllToAllExchange", x_ND: torch.Tensor,
                 asynchronous: bool) -> None:
        self.ex, self.x, self.asynchronous = exchange, x_ND, asynchronous
        self.pieces: list[_Piece] = []

    @property
    def chunks(self) -> int:
        return len(self.pieces)

    def _move(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        if self.asynchronous:
            return start_rows(x, output_splits, input_splits, self.ex.ep_group)
        return all_to_all_rows(x, output_splits, input_splits, self.ex.ep_group)

    def _arrived(self, moved) -> torch.Tensor:
        return wait_rows(*moved) if self.asynchronous else moved

    def _send_rows(self, piece: _Piece) -> torch.Tensor:
        raise NotImplementedError

    def send(self, chunk: int) -> None:
        p = self.pieces[chunk]
        p.link = self._move(self._send_rows(p), p.recv_splits, p.send_splits)

    def receive(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        p, ex = self.pieces[chunk], self.ex
        x_RD = self._arrived(p.link)
        p.link = None
        if p.etp_splits is not None:
            # All-gather over ETP (every ETP rank then computes its hidden shard of every row).
            x_RD = all_to_all_rows(x_RD.repeat(ex.etp_size, 1), p.etp_splits,
                                   [x_RD.shape[0]] * ex.etp_size, ex.etp_group)
        if p.order is not None:
            x_RD = x_RD.index_select(0, p.order)
        return x_RD, p.counts, p.lo

    def send_back(self, chunk: int, y_RD: torch.Tensor) -> None:
        p, ex = self.pieces[chunk], self.ex
        if p.order is not None:  # expert-major -> the order the rows arrived in
            y_RD = torch.zeros_like(y_RD).index_copy(0, p.order, y_RD)
        if p.etp_splits is not None:
            # Reduce-scatter over ETP: each rank gets every ETP rank's partial output of its own
            # received rows and sums them (fixed order, fp32), i.e. the full hidden width.
            n = sum(p.recv_splits)
            parts = all_to_all_rows(y_RD, [n] * ex.etp_size, p.etp_splits, ex.etp_group)
            y_RD = parts.view(ex.etp_size, n, -1).sum(0, dtype=torch.float32).to(y_RD.dtype)
        p.y = self._move(y_RD, p.send_splits, p.recv_splits)

    def gather(self) -> torch.Tensor:
        return self._assemble([self._arrived(p.y) for p in self.pieces])

    def _assemble(self, ys: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class _ExactFlow(_Flow):
    """Receive buffers of exactly the rows sent: the split sizes are read on the host, once per
    forward for every piece (the one host read of `AllToAllExchange`)."""

    def __init__(self, exchange: "AllToAllExchange", x_ND: torch.Tensor,
                 counts_E: torch.Tensor, chunks: int, asynchronous: bool) -> None:
        super().__init__(exchange, x_ND, asynchronous)
        ex = exchange
        ep, L, etp = ex.ep_size, ex.num_local_experts, ex.etp_size
        # Rows are sorted by global expert, and EP rank j owns experts [j L, (j+1) L), so the
        # rows of a piece for rank j are one contiguous block: an all-to-all with uneven splits
        # moves them.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=ex.ep_group)
        counts_SL = recv_counts.view(ep, L)  # [source EP rank, local expert]
        if etp > 1:
            gathered = recv_counts.new_empty(etp * ep * L)
            dist.all_gather_into_tensor(gathered, recv_counts, group=ex.etp_group)
            counts_SL = gathered.view(etp * ep, L)  # sources: (ETP rank, EP rank), ETP outer
        bounds = _chunk_bounds(L, chunks)
        send_JL = counts_E.view(ep, L)
        # One host sync for every split size of every piece.
        host = torch.cat([torch.cat([send_JL[:, lo:hi].sum(1), counts_SL[:, lo:hi].sum(1)])
                          for lo, hi in bounds]).tolist()
        starts_JL = (torch.cumsum(counts_E, 0) - counts_E).view(ep, L)
        width = ep + counts_SL.shape[0]
        for i, (lo, hi) in enumerate(bounds):
            part = host[i * width:(i + 1) * width]
            send_splits, rows_S = part[:ep], part[ep:]
            rows = None  # one piece: the kept rows, the first ones of x
            if len(bounds) > 1:  # the piece's block of every destination, in order
                rows = _ranges(starts_JL[:, lo], send_JL[:, lo:hi].sum(1), sum(send_splits))
            self.pieces.append(_Piece(
                lo, hi, send_splits, rows_S[ex.etp_rank * ep:(ex.etp_rank + 1) * ep],
                [sum(rows_S[j * ep:(j + 1) * ep]) for j in range(etp)] if etp > 1 else None,
                _expert_major_order(counts_SL[:, lo:hi], sum(rows_S)),
                counts_SL[:, lo:hi].sum(0), rows))

    # Only the kept rows travel; the dropped ones sort after them (TokenDispatcher.permute).
    def _send_rows(self, p: _Piece) -> torch.Tensor:
        return self.x[:sum(p.send_splits)] if p.rows is None else self.x.index_select(0, p.rows)

    def _assemble(self, ys: list[torch.Tensor]) -> torch.Tensor:
        rows = self.x.shape[0]
        if len(ys) == 1:  # back to every assignment
            return F.pad(ys[0], (0, 0, 0, rows - ys[0].shape[0]))
        index = torch.cat([p.rows for p in self.pieces])
        return ys[0].new_zeros(rows, ys[0].shape[1]).index_copy(0, index, torch.cat(ys))

    @property
    def send_splits(self) -> list[int]:
        """Rows sent to each EP rank (all pieces)."""
        return [sum(s) for s in zip(*(p.send_splits for p in self.pieces))]

    @property
    def recv_splits(self) -> list[int]:
        """Rows received from each EP rank (all pieces)."""
        return [sum(s) for s in zip(*(p.recv_splits for p in self.pieces))]


class _SyncFreeFlow(_Flow):
    """Static buffers: each rank sends every EP rank a slot of S rows per piece, its rows for
    that rank's experts first and padding after, by an all-to-all with equal splits; the counts
    travel on the device and tell each rank where its rows end. Nothing is read on the host.

    S = min(ceil(budget x balanced), bound): balanced = A n / (ep L) rows (A rows permuted
    here, n of the L local experts in the piece), bound = A, or n C with a capacity C. Rows past
    a slot are not sent (their outputs come back as zeros): the forward overflowed, which the
    counters say; the trainer then redoes the step with a larger budget.
    """

    def __init__(self, exchange: "AllToAllExchange", x_ND: torch.Tensor,
                 counts_E: torch.Tensor, chunks: int, budget: float,
                 capacity: Optional[int], asynchronous: bool) -> None:
        super().__init__(exchange, x_ND, asynchronous)
        ex = exchange
        ep, L, etp, E = ex.ep_size, ex.num_local_experts, ex.etp_size, ex.num_experts
        A, device = x_ND.shape[0], x_ND.device
        counts_E = counts_E.contiguous()
        recv_counts = funcol.all_to_all_single(counts_E, None, None, ex.ep_group)
        if etp > 1:
            recv_counts = _all_gather(recv_counts, 0, ex.etp_group)
        counts_SL = recv_counts.view(-1, L)  # [(ETP rank,) EP rank of the source, local expert]
        send_JL = counts_E.view(ep, L)
        starts_JL = (torch.cumsum(counts_E, 0) - counts_E).view(ep, L)
        # Where each permuted row goes: its expert's rank j and local expert l.
        m = torch.arange(A, device=device)
        expert_M = torch.searchsorted(torch.cumsum(counts_E, 0), m, right=True)
        kept_M = expert_M < E  # rows after the kept ones were dropped by the routing
        expert_M = expert_M.clamp(max=E - 1)
        j_M, l_M = expert_M // L, expert_M % L
        self.valid_M = torch.zeros(A, dtype=torch.bool, device=device)
        self.pos_M = torch.zeros(A, dtype=torch.long, device=device)
        overflow = need = rows = torch.zeros((), dtype=torch.float64, device=device)
        slots, offset = 0, 0
        for lo, hi in _chunk_bounds(L, chunks):
            n = hi - lo
            balanced = A * n / (ep * L)
            bound = A if capacity is None else min(A, n * capacity)
            S = max(0, min(math.ceil(budget * balanced), bound))
            sends_J = send_JL[:, lo:hi].sum(1)  # rows for each EP rank, before the budget
            p = torch.arange(S, device=device)
            valid_JS = p < sends_J[:, None]
            src_JS = (starts_JL[:, lo, None] + p).clamp(0, max(A - 1, 0))
            # Receiving side: rows of source s up to its counts, then padding (key n).
            cum_SL = torch.cumsum(counts_SL[:, lo:hi], 1).clamp(max=S).contiguous()
            arrived_SL = torch.diff(cum_SL, dim=1, prepend=torch.zeros_like(cum_SL[:, :1]))
            key = torch.searchsorted(cum_SL, p.expand(cum_SL.shape[0], S).contiguous(),
                                     right=True)
            piece = _Piece(lo, hi, [S] * ep, [S] * ep, [ep * S] * etp if etp > 1 else None,
                           torch.argsort(key.reshape(-1), stable=True), arrived_SL.sum(0))
            piece.extra = {"valid": valid_JS.reshape(-1), "src": src_JS.reshape(-1)}
            self.pieces.append(piece)
            # The way back: row m of x <- slot (j, m - start) of this piece's returned rows.
            slot_M = m - starts_JL[j_M, lo]
            fits_M = kept_M & (l_M >= lo) & (l_M < hi) & (slot_M < S)
            self.valid_M |= fits_M
            self.pos_M = torch.where(fits_M, offset + j_M * S + slot_M, self.pos_M)
            offset += ep * S
            slots += ep * S
            overflow = torch.maximum(overflow, (sends_J > S).any().to(torch.float64))
            if balanced > 0:
                need = torch.maximum(need, sends_J.max().to(torch.float64) / balanced)
            mine = arrived_SL[ex.etp_rank * ep:(ex.etp_rank + 1) * ep]  # the EP hop's rows
            rows = rows + mine.sum().to(torch.float64)
        self.counters = torch.stack([overflow, need, rows, torch.full_like(rows, slots)])

    def _send_rows(self, p: _Piece) -> torch.Tensor:
        valid, src = p.extra["valid"], p.extra["src"]
        if self.x.shape[0] == 0:
            return self.x.new_zeros(src.shape[0], self.x.shape[1])
        return torch.where(valid[:, None], self.x.index_select(0, src), 0)

    def _assemble(self, ys: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(ys)
        if y.shape[0] == 0:
            return y.new_zeros(self.x.shape[0], y.shape[1])
        return torch.where(self.valid_M[:, None], y.index_select(0, self.pos_M), 0)


class AllToAllExchange:
    """The dispatcher's exchange (moetrain/model/moe/dispatcher.py) under EP: the rows of every
    expert to the EP rank holding it, by all-to-all with uneven splits, and back.

    A flow's `receive` returns the rows of this rank's local experts of the piece (L = E / ep in
    all), expert-major, with their counts; `gather` returns this rank's own rows. Only kept rows
    travel (capacity is decided per source rank before the exchange); with `pad_to_capacity`
    the padded rows are exchanged too. Experts and ranks with zero rows are fine (zero-size
    exchanges and GEMMs). With ETP the received rows are all-gathered over the ETP group and the
    partial outputs reduce-scattered back. The split sizes are read on the host once per
    forward; `budget` is ignored (exact sizes).
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup,
                 etp_group: Optional[dist.ProcessGroup] = None):
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        assert num_experts % self.ep_size == 0  # moetrain.parallel.checks
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.etp_group = etp_group
        self.etp_size = 1 if etp_group is None else dist.get_world_size(etp_group)
        self.etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)

    def open(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, *, chunks: int = 1,
             budget: Optional[float] = None, capacity: Optional[int] = None,
             asynchronous: bool = False) -> _Flow:
        return _ExactFlow(self, x_ND, tokens_per_expert_E, chunks, asynchronous)


class SyncFreeAllToAllExchange(AllToAllExchange):
    """`AllToAllExchange` with static receive buffers (`model.moe.ep_budget`): no host read,
    static shapes (CUDA-graph capturable, torch.compile(fullgraph=True)). All EP (and ETP) ranks
    must permute the same number of rows per forward (the trainer's micro-batches all have one
    shape). With `budget` None (evaluation) it is the exact-size exchange."""

    def open(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, *, chunks: int = 1,
             budget: Optional[float] = None, capacity: Optional[int] = None,
             asynchronous: bool = False) -> _Flow:
        if budget is None:
            return _ExactFlow(self, x_ND, tokens_per_expert_E, chunks, asynchronous)
        return _SyncFreeFlow(self, x_ND, tokens_per_expert_E, chunks, budget, capacity,
                             asynchronous)


def exchange_backend(num_experts: int, ep_group: dist.ProcessGroup,
                     etp_group: Optional[dist.ProcessGroup], *, sync_free: bool):
    """The exchange backend `apply_expert_parallel` installs. A GPU-only backend (DeepEP,
    HybridEP) goes here behind its capability check (package importable, CUDA, the
    interconnect it needs), keeping these all-to-alls as the PyTorch path its tests compare
    against; the MoE layer only sees the `Exchange` protocol."""
    cls = SyncFreeAllToAllExchange if sync_free else AllToAllExchange
    return cls(num_experts, ep_group, etp_group)


def _shard_experts(name: str, experts: nn.Module, mesh: DeviceMesh) -> None:
    """distribute_module's partition_fn: w1, w3 [E, D, F] and w2 [E, F, D] as DTensors sharded
    by expert over ep (dim 0) and by hidden column over etp (F). Each rank takes its block of
    the tensor it holds (on the meta device: nothing to take; the trainer initialises each
    rank's block afterwards, moetrain/model/init.py), so nothing is sent."""
    for p_name, hidden_dim in (("w1", 2), ("w3", 2), ("w2", 1)):
        w = experts.get_parameter(p_name)
        shards = distribute_tensor(w.detach(), mesh, [Shard(0), Shard(hidden_dim)],
                                   src_data_rank=None)
        experts.register_parameter(p_name, nn.Parameter(shards, requires_grad=w.requires_grad))


def apply_expert_parallel(model: nn.Module, experts_mesh: DeviceMesh, *,
                          sync_free: bool = False) -> nn.Module:
    """Shard every MoE layer's experts over the 2-D ("ep", "etp") `experts_mesh` (the MoE mesh's
    view, moetrain.parallel.mesh.Meshes.experts) and move their rows by all-to-all (with
    `sync_free`, `SyncFreeAllToAllExchange`: static buffers of the layers' per-step budget).

    The expert weights become DTensors with the global [E, D, F] / [E, F, D] shapes: DCP saves
    every shard once and loads it into any other layout, the gradient norm counts each shard
    once, and FSDP2 over the expert-data-parallel ranks shards them further. The forward
    computes with the local shards (`GroupedExperts` unwraps them). Call on every rank with the
    same full model - on the meta device in the trainer -, before FSDP and before the optimizer
    is built (the expert parameters are replaced). Returns the model, modified in place.
    """
    if experts_mesh.ndim != 2:
        raise ValueError(f"expected the 2-D (ep, etp) mesh, got {experts_mesh}")
    ep_group = experts_mesh.get_group(0)
    etp_group = experts_mesh.get_group(1) if experts_mesh.size(1) > 1 else None
    for layer in moe_layers(model):
        if isinstance(layer.experts.w1, DTensor):
            raise RuntimeError("apply_expert_parallel: this model's experts are already sharded")
        distribute_module(layer.experts, experts_mesh, _shard_experts)
        # Real experts only: null-expert routing slots (if any) never reach the exchange.
        num_experts = layer.experts.w1.shape[0]
        layer.use_layout(exchange=exchange_backend(num_experts, ep_group, etp_group,
                                                   sync_free=sync_free))
    return model


__all__ = ["AllToAllExchange", "Flight", "SyncFreeAllToAllExchange", "all_to_all_rows",
           "apply_expert_parallel", "exchange_backend", "start_rows", "wait_rows"]
