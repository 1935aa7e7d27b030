"""Token dispatch: route token rows to their experts' contiguous buffers and back.

    dispatch(x_TD, routing) -> (expert_inputs_ND, tokens_per_expert_E, handle)
    combine(expert_out_ND, handle) -> y_TD,  y[t] = sum_j keep[t,j] * w[t,j] * out(t, j)

The dispatch is three stages; an expert-parallel dispatcher (moetrain.parallel) subclasses
`LocalDispatcher` and overrides only the middle one:

    permute   (local)   sort the assignments by expert, gather their rows
    exchange  (comm)    identity here; all-to-all to the ranks owning the experts for EP > 1
    [experts: grouped GEMM over the received rows]
    exchange_back       identity here; the reverse all-to-all
    unpermute (local)   weight the rows and sum each token's k rows

Shapes are static: all T*k assignments are permuted, dropped ones (capacity, token rounding,
null experts, beyond a top-p threshold) sorted after the kept ones, so no tensor's size depends
on the routing and nothing reads the device from the host. The experts' counts cover the kept
rows only; the rows after them are not computed, are zeroed on the way in (no gradient reaches
their tokens) and masked on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from moetrain.model.moe.capacity import count_per_expert
from moetrain.model.moe.router import RouterOutput


@dataclass
class PermuteHandle:
    """What unpermute needs to put expert rows back; N = T * k permuted assignments."""

    slot_N: torch.Tensor  # flat assignment index t * k + j of each permuted row
    weight_N: torch.Tensor  # its combine weight (fp32)
    rows_N: Optional[torch.Tensor]  # its row in a capacity-padded buffer; None = row i is i
    num_tokens: int
    top_k: int
    kept_N: Optional[torch.Tensor] = None  # bool: computed (the first rows); None = all


@dataclass
class DispatchHandle:
    permute: PermuteHandle
    exchange: Any = None  # whatever exchange() needs to undo itself


class LocalDispatcher:
    """EP = 1: every expert is local, the exchange is the identity.

    With `pad_to_capacity` and a routing that carries a capacity, every expert's buffer is
    padded with zero rows to exactly `capacity` rows (static shapes).
    """

    def __init__(self, num_experts: int, pad_to_capacity: bool = False):
        self.num_experts = num_experts
        self.pad_to_capacity = pad_to_capacity

    def dispatch(self, x_TD: torch.Tensor, routing: RouterOutput):
        x_ND, counts_E, perm = self.permute(x_TD, routing)
        x_ND, counts_local, comm = self.exchange(x_ND, counts_E)
        return x_ND, counts_local, DispatchHandle(perm, comm)

    def combine(self, y_ND: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        y_ND = self.exchange_back(y_ND, handle.exchange)
        return self.unpermute(y_ND, handle.permute)

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        return x_ND, tokens_per_expert_E, None

    def exchange_back(self, y_ND: torch.Tensor, state: Any) -> torch.Tensor:
        return y_ND

    def permute(self, x_TD: torch.Tensor, routing: RouterOutput):
        """Rows of x grouped by expert (token order within an expert; dropped assignments last),
        [T*k, D], and the kept rows per expert, counts [E] int64."""
        T, K = routing.topk_idx_TK.shape
        E = self.num_experts
        expert_A = routing.topk_idx_TK.reshape(-1)
        kept_N = None
        if routing.keep_TK is not None:  # dropped assignments to a bucket past the experts
            expert_A = expert_A.masked_fill(~routing.keep_TK.reshape(-1), E)
        slot_N = torch.argsort(expert_A, stable=True)
        expert_N = expert_A[slot_N]
        counts_E = count_per_expert(expert_A, E + 1)[:E]
        x_ND = x_TD.index_select(0, torch.div(slot_N, K, rounding_mode="floor"))
        if routing.keep_TK is not None:
            kept_N = expert_N < E
            x_ND = torch.where(kept_N.unsqueeze(-1), x_ND, 0)
        weight_N = routing.topk_weight_TK.reshape(-1)[slot_N]
        rows_N = None
        if self.pad_to_capacity and routing.capacity is not None:
            C = routing.capacity
            start_E = torch.cumsum(counts_E, 0) - counts_E
            rank_N = torch.arange(T * K, device=x_TD.device) - start_E[expert_N.clamp(max=E - 1)]
            # Dropped rows go to a spare row past the E*C buffer (then cut off).
            rows_N = expert_N * C + rank_N if kept_N is None else torch.where(
                kept_N, expert_N * C + rank_N, E * C)
            x_ND = x_ND.new_zeros(E * C + 1, x_ND.shape[1]).index_copy(0, rows_N, x_ND)[:E * C]
            counts_E = torch.full_like(counts_E, C)
        return x_ND, counts_E, PermuteHandle(slot_N, weight_N, rows_N, T, K, kept_N)

    def unpermute(self, y_ND: torch.Tensor, perm: PermuteHandle) -> torch.Tensor:
        """Weighted sum of each token's k expert rows; dropped assignments add zero.

        Rows are copied into a [T*k, D] buffer and summed over k instead of index_add'ed into
        [T, D]: the sum order is fixed, so the result is deterministic on GPU too (no atomics).
        """
        if perm.rows_N is not None:
            y_ND = F.pad(y_ND, (0, 0, 0, 1)).index_select(0, perm.rows_N)  # the spare row: 0
        if perm.kept_N is not None:
            # Rows the experts did not compute hold garbage (NaN, inf): zero them before they
            # meet the weights, whose gradient would otherwise be 0 * NaN.
            y_ND = torch.where(perm.kept_N.unsqueeze(-1), y_ND, 0)
        weighted_ND = (y_ND.float() * perm.weight_N.unsqueeze(-1)).to(y_ND.dtype)
        T, K, D = perm.num_tokens, perm.top_k, y_ND.shape[1]
        y_AD = y_ND.new_zeros(T * K, D).index_copy(0, perm.slot_N, weighted_ND)
        return y_AD.view(T, K, D).sum(1, dtype=torch.float32).to(y_ND.dtype)
