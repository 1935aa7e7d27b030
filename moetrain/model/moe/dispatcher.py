"""Token dispatch: route token rows to their experts' contiguous buffers and back.

    dispatch(x_TD, routing) -> (expert_inputs_ND, tokens_per_expert_E, handle)
    combine(expert_out_ND, handle) -> y_TD,  y[t] = sum_j keep[t,j] * w[t,j] * out(t, j)

The dispatch is three stages; the middle one is a backend (`Exchange`) that the parallel code
replaces through `MoELayer.use_layout` (moetrain.parallel.expert_parallel: the all-to-all):

    permute   (local)   sort the assignments by expert, gather their rows
    exchange  (comm)    `LocalExchange`: identity; under EP, to the ranks owning the experts
    [experts: grouped GEMM over the received rows]
    exchange_back       the reverse
    unpermute (local)   weight the rows and sum each token's k rows

Shapes are static: all T*k assignments are permuted, dropped ones (capacity, token rounding,
null experts, beyond a top-p threshold) sorted after the kept ones, so no tensor's size depends
on the routing and nothing reads the device from the host. The experts' counts cover the kept
rows only; the rows after them are not computed, are zeroed on the way in (no gradient reaches
their tokens) and masked on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from moetrain import kernels
from moetrain.kernels.rowmap import RowMap
from moetrain.model.moe.capacity import count_per_expert
from moetrain.model.moe.router import RouterOutput


@dataclass
class PermuteHandle:
    """What unpermute needs to put expert rows back."""

    row_map: RowMap  # buffer row <-> assignment, both ways (moetrain.kernels.rowmap)
    weight_TK: torch.Tensor  # combine weights [T, k] (fp32)
    kept_M: Optional[torch.Tensor] = None  # bool [M]: rows the experts compute; None = all


@dataclass
class DispatchHandle:
    permute: PermuteHandle
    exchange: Any = None  # whatever exchange() needs to undo itself


class Exchange(Protocol):
    """Moves permuted expert rows to the ranks that hold their experts, and back.

    exchange(x_ND, tokens_per_expert_E): rows grouped by global expert (the kept ones first,
    `tokens_per_expert_E` [E] of them per expert) -> (rows of this rank's experts grouped by
    local expert, rows per local expert, state); exchange_back(y, state) -> the rows of
    `exchange`'s input, in its order (rows that were not kept as zeros)."""

    def exchange(self, x_ND: torch.Tensor,
                 tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def exchange_back(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor: ...


class LocalExchange:
    """EP = 1: every expert is local; the identity."""

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        return x_ND, tokens_per_expert_E, None

    def exchange_back(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor:
        return y_ND


class TokenDispatcher:
    """permute -> `exchange` -> [experts] -> exchange back -> unpermute.

    With `pad_to_capacity` and a routing that carries a capacity, every expert's buffer is
    padded with zero rows to exactly `capacity` rows. `kernels` (`model.moe.kernels`: auto |
    torch | triton) picks the Triton or the PyTorch permute and combine (moetrain.kernels).
    """

    def __init__(self, num_experts: int, pad_to_capacity: bool = False, kernels: str = "auto",
                 exchange: Optional[Exchange] = None):
        self.num_experts = num_experts
        self.pad_to_capacity = pad_to_capacity
        self.kernels = kernels
        self.exchange: Exchange = exchange or LocalExchange()

    def dispatch(self, x_TD: torch.Tensor, routing: RouterOutput):
        x_ND, counts_E, perm = self.permute(x_TD, routing)
        x_ND, counts_local, comm = self.exchange.exchange(x_ND, counts_E)
        return x_ND, counts_local, DispatchHandle(perm, comm)

    def combine(self, y_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        y_ND = self.exchange.exchange_back(y_ND, handle.exchange)
        return self.unpermute(y_ND, handle.permute)

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
