"""Token dispatch: route token rows to their experts' contiguous buffers and back.

    y_TD = dispatcher(x_TD, routing, experts, shared)      # the MoE layer's one call
    dispatch(x_TD, routing) -> (expert_inputs_ND, tokens_per_expert_E, handle)   # one piece,
    combine(expert_out_ND, handle) -> y_TD                                       # in two calls
    y[t] = sum_j keep[t,j] * w[t,j] * out(t, j)  (+ shared(x)[t])

The dispatch is three stages; the middle one is a backend (`Exchange`) that the parallel code
replaces through `MoELayer.use_layout` (moetrain.parallel.expert_parallel: the all-to-alls):

    permute   (local)   sort the assignments by expert, gather their rows
    exchange  (comm)    `LocalExchange`: identity; under EP, to the ranks owning the experts
    [experts: grouped GEMM over the received rows]
    exchange back       the reverse
    unpermute (local)   weight the rows and sum each token's k rows

The exchange runs as an `ExchangeFlow` in one or two pieces ("chunks": the EP ranks' local
experts split in two). With `overlap` the pieces' all-to-alls are asynchronous: both halves are
sent, the shared experts compute while they travel, then each half's experts compute while the
other half is in flight (forward and, through the backend's autograd, backward). Every GEMM sees
exactly the rows it sees without overlap, so the results are the same bits
(docs/expert_parallel.md, "Overlap").

Shapes are static: all T*k assignments are permuted, dropped ones (capacity, token rounding,
null experts, beyond a top-p threshold) sorted after the kept ones, so no tensor's size depends
on the routing and nothing reads the device from the host. The experts' counts cover the kept
rows only; the rows after them are not computed, are zeroed on the way in (no gradient reaches
their tokens) and masked on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from moetrain import kernels
from moetrain.kernels.rowmap import RowMap
from moetrain.model.moe.capacity import count_per_expert
from moetrain.model.moe.router import RouterOutput

#: experts(x_ND, tokens_per_expert_L, first_local_expert) -> y_ND: the routed experts of one
#: piece (`GroupedExperts.forward`).
Experts = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class PermuteHandle:
    """What unpermute needs to put expert rows back."""

    row_map: RowMap  # buffer row <-> assignment, both ways (moetrain.kernels.rowmap)
    weight_TK: torch.Tensor  # combine weights [T, k] (fp32)
    kept_M: Optional[torch.Tensor] = None  # bool [M]: rows the experts compute; None = all


@dataclass
class DispatchHandle:
    permute: PermuteHandle
    exchange: "ExchangeFlow"  # the open exchange, to send the outputs back


class ExchangeFlow(Protocol):
    """One forward's exchange of expert rows, opened by `Exchange.open`, in `chunks` pieces.

    Piece c holds the rows of a contiguous range of every EP rank's local experts. Call, for
    each piece, `send(c)` (starts moving its rows; returns at once where the backend is
    asynchronous), `receive(c)` -> (rows of this rank's experts of the piece, expert-major, [R_c,
    D]; their counts [n_c]; the piece's first local expert), then `send_back(c, y)` with the
    experts' outputs of those rows; `gather()` waits for every piece and returns the outputs in
    the order of the rows `open` got (rows that were not kept as zeros). Autograd-aware: the
    backward runs the reverse moves.

    `counters`: None, or (sync-free backends) this forward's device counters [4] float64:
    overflowed (1 if some rows did not fit the budget, else 0), need (the largest rows sent to
    one rank, as a factor of the balanced load), rows received, receive-buffer rows.
    """

    chunks: int
    counters: Optional[torch.Tensor]

    def send(self, chunk: int) -> None: ...

    def receive(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, int]: ...

    def send_back(self, chunk: int, y: torch.Tensor) -> None: ...

    def gather(self) -> torch.Tensor: ...


class Exchange(Protocol):
    """Moves permuted expert rows to the ranks that hold their experts, and back: the backend
    of `TokenDispatcher` (all-to-all, sync-free all-to-all, or e.g. DeepEP on a GPU).

    open(x_ND, tokens_per_expert_E, chunks=, budget=, capacity=, asynchronous=): rows grouped
    by global expert, the kept ones first, `tokens_per_expert_E` [E] of them per expert ->
    the `ExchangeFlow` of this forward. `chunks`: pieces wanted (the flow may make fewer, e.g.
    with one local expert); `budget`: a sync-free backend's receive budget as a factor of the
    balanced load (None: exact sizes; backends without a budget ignore it); `capacity`: the
    routing's per-expert capacity, a bound on the rows per expert (None: dropless);
    `asynchronous`: start the pieces' moves without waiting (overlap)."""

    def open(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, *, chunks: int = 1,
             budget: Optional[float] = None, capacity: Optional[int] = None,
             asynchronous: bool = False) -> ExchangeFlow: ...


class LocalFlow:
    """EP = 1: every expert is local; one piece, the identity."""

    chunks = 1
    counters = None

    def __init__(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> None:
        self._x, self._counts, self._y = x_ND, tokens_per_expert_E, None

    def send(self, chunk: int) -> None:
        pass

    def receive(self, chunk: int):
        return self._x, self._counts, 0

    def send_back(self, chunk: int, y: torch.Tensor) -> None:
        self._y = y

    def gather(self) -> torch.Tensor:
        return self._y


class LocalExchange:
    """EP = 1: every expert is local; the identity."""

    def open(self, x_ND, tokens_per_expert_E, *, chunks=1, budget=None, capacity=None,
             asynchronous=False) -> LocalFlow:
        return LocalFlow(x_ND, tokens_per_expert_E)


class TokenDispatcher:
    """permute -> `exchange` -> [experts] -> exchange back -> unpermute.

    With `pad_to_capacity` and a routing that carries a capacity, every expert's buffer is
    padded with zero rows to exactly `capacity` rows. `kernels` (`model.moe.kernels`: auto |
    torch | triton) picks the Triton or the PyTorch permute and combine (moetrain.kernels).
    `overlap` (`model.moe.ep_overlap`): the exchange in two asynchronous pieces overlapped with
    the experts' and shared experts' compute. `budget` (`model.moe.ep_budget`, set per step by
    the layer): a sync-free exchange's receive budget; None = exact sizes.
    """

    def __init__(self, num_experts: int, pad_to_capacity: bool = False, kernels: str = "auto",
                 exchange: Optional[Exchange] = None, overlap: bool = False):
        self.num_experts = num_experts
        self.pad_to_capacity = pad_to_capacity
        self.kernels = kernels
        self.exchange: Exchange = exchange or LocalExchange()
        self.overlap = overlap
        self.budget: Optional[float] = None

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts: Experts,
                 shared: Optional[Callable[[], torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The routed output of x [T, D] plus `shared()` (the shared experts' [T, D], computed
        while the rows travel when overlapping), and the exchange's counters (`ExchangeFlow`)."""
        x_ND, counts_E, perm = self.permute(x_TD, routing)
        # Under torch.compile the pieces go one after the other (the compiler schedules the
        # collectives); explicit asynchrony is an eager-mode schedule.
        asynchronous = self.overlap and not torch.compiler.is_compiling()
        flow = self.exchange.open(x_ND, counts_E, chunks=2 if self.overlap else 1,
                                  budget=self.budget, capacity=routing.capacity,
                                  asynchronous=asynchronous)
        shared_TD = None
        if asynchronous:
            for c in range(flow.chunks):
                flow.send(c)
            if shared is not None:  # while every piece is in flight
                shared_TD = shared()
        for c in range(flow.chunks):
            if not asynchronous:
                flow.send(c)
            x_c, counts_c, first = flow.receive(c)
            flow.send_back(c, experts(x_c, counts_c, first))
        y_TD = self.unpermute(flow.gather(), perm)
        if shared is not None:
            y_TD = y_TD + (shared() if shared_TD is None else shared_TD)
        return y_TD, flow.counters

    def dispatch(self, x_TD: torch.Tensor, routing: RouterOutput):
        """The received rows [R, D] of this rank's experts, their counts and the handle for
        `combine` (one piece, synchronous)."""
        x_ND, counts_E, perm = self.permute(x_TD, routing)
        flow = self.exchange.open(x_ND, counts_E, budget=self.budget, capacity=routing.capacity)
        flow.send(0)
        x_RD, counts_local, _ = flow.receive(0)
        return x_RD, counts_local, DispatchHandle(perm, flow)

    def combine(self, y_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        handle.exchange.send_back(0, y_ND)
        return self.unpermute(handle.exchange.gather(), handle.permute)

    def permute(self, x_TD: torch.Tensor, routing: RouterOutput):
        """Rows of x grouped by expert (token order within an expert; dropped assignments last),
        [M, D] with M = T*k (E*C with pad_to_capacity), and the kept rows per expert, counts
        [E] int64."""
        T, K = routing.topk_idx_TK.shape
        E, A = self.num_experts, T * K
        device = x_TD.device
        expert_A = routing.topk_idx_TK.reshape(-1)
        if routing.keep_TK is not None:  # dropped assignments to a bucket past the experts
            expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), E)
        slot_N = torch.argsort(expert_A, stable=True)  # assignment of permuted row n
        expert_N = expert_A[slot_N]
        counts_E = count_per_expert(expert_A, E + 1)[:E]
        padded = routing.keep_TK is not None
        if self.pad_to_capacity and routing.capacity is not None:
            C = routing.capacity
            start_E = torch.cumsum(counts_E, 0) - counts_E
            rank_N = torch.arange(A, device=device) - start_E[expert_N.clamp(max=E - 1)]
            rows_N = expert_N * C + rank_N
            if padded:  # dropped rows to a spare row past the E*C buffer (then cut off)
                rows_N = torch.where(expert_N < E, rows_N, E * C)
            M, padded, counts_E = E * C, True, torch.full_like(counts_E, C)
        else:
            rows_N, M = torch.arange(A, device=device), A
        kept_N = expert_N < E
        slot_M = torch.full((M + 1,), -1, dtype=torch.long, device=device)
        slot_M = slot_M.scatter(0, rows_N, torch.where(kept_N, slot_N, -1))[:M]
        pos_A = torch.full((A,), -1, dtype=torch.long, device=device)
        pos_A = pos_A.scatter(0, slot_N, torch.where(kept_N, rows_N, -1))
        row_map = RowMap(slot_M, pos_A.view(T, K), padded=padded)
        x_MD = kernels.permute(x_TD, row_map, self.kernels)
        kept_M = (slot_M >= 0) if padded else None
        return x_MD, counts_E, PermuteHandle(row_map, routing.topk_weight_TK, kept_M)

    def unpermute(self, y_MD: torch.Tensor, perm: PermuteHandle) -> torch.Tensor:
        """Weighted sum of each token's k expert rows (fp32, in j order: deterministic, no
        atomics); dropped assignments add zero."""
        if perm.kept_M is not None:
            # Rows the experts did not compute hold garbage (NaN, inf): zero them before they
            # meet the weights, whose gradient would otherwise be 0 * NaN.
            y_MD = torch.where(perm.kept_M.unsqueeze(-1), y_MD, 0)
        return kernels.unpermute(y_MD, perm.weight_TK, perm.row_map, self.kernels)
