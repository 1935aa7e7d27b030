"""Expert parallelism (EP) and expert tensor parallelism (ETP) for the MoE layers.

    apply_expert_parallel(model, experts_mesh)   every MoE layer's experts as DTensor shards of
                                                 the (ep, etp) mesh, rows moved by all-to-all

EP rank r holds experts [r E/ep, (r+1) E/ep); ETP rank s holds hidden columns
[s F/etp, (s+1) F/etp) of each. Capacity is decided before the exchange, on each rank's own
tokens. Layout, data flow, capacity and ETP rules: docs/expert_parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    Autograd-aware: the backward is the reverse exchange. Every row the expert path moves between
    ranks goes through this one function (the byte-count test wraps it).
    """
    return funcol.all_to_all_single_autograd(
        x_ND.contiguous(), list(output_splits), list(input_splits), group
    )


@dataclass
class ExchangeState:
    """What `exchange_back` needs to undo `exchange`."""

    send_splits: list[int]  # rows this rank sent to each EP rank
    recv_splits: list[int]  # rows it received from each EP rank
    etp_splits: Optional[list[int]]  # rows each ETP rank contributed to the gather; None = no ETP
    order_N: Optional[torch.Tensor]  # received row feeding expert-major row n; None = identity
    rows: int  # rows the permute produced (kept first, the rest padded back as zeros)


class AllToAllExchange:
    """The dispatcher's exchange (moetrain/model/moe/dispatcher.py) under EP: the rows of every
    expert to the EP rank holding it, by all-to-all with uneven splits, and back.

    `exchange` returns the rows of this rank's L = E / ep local experts, expert-major, with their
    counts [L]; `exchange_back` returns this rank's own rows. Only kept rows travel (capacity is
    decided per source rank before the exchange); with `pad_to_capacity` the padded rows are
    exchanged too (static shapes). Experts and ranks with zero rows are fine (zero-size
    exchanges and GEMMs). With ETP the received rows are all-gathered over the ETP group and the
    partial outputs reduce-scattered back.
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup,
                 etp_group: Optional[dist.ProcessGroup] = None):
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        assert num_experts % self.ep_size == 0  # moetrain.parallel.checks
        self.num_local_experts = num_experts // self.ep_size
        self.etp_group = etp_group
        self.etp_size = 1 if etp_group is None else dist.get_world_size(etp_group)
        self.etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)

    def exchange(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor):
        ep, L, etp = self.ep_size, self.num_local_experts, self.etp_size
        # Rows are sorted by global expert, and EP rank j owns experts [j L, (j+1) L), so the
        # rows for rank j are one contiguous block: an all-to-all with uneven splits moves them.
        recv_counts = torch.empty_like(tokens_per_expert_E)
        dist.all_to_all_single(recv_counts, tokens_per_expert_E.contiguous(), group=self.ep_group)
        counts_SL = recv_counts.view(ep, L)  # [source EP rank, local expert]
        if etp > 1:
            gathered = recv_counts.new_empty(etp * ep * L)
            dist.all_gather_into_tensor(gathered, recv_counts, group=self.etp_group)
            counts_SL = gathered.view(etp * ep, L)  # sources: (ETP rank, EP rank), ETP outer
        # One host sync for every split size.
        host = torch.cat([tokens_per_expert_E.view(ep, L).sum(1), counts_SL.sum(1)]).tolist()
        send_splits, rows_S = host[:ep], host[ep:]
        recv_splits = rows_S[self.etp_rank * ep:(self.etp_rank + 1) * ep]

        # Only the kept rows travel; the dropped ones sort after them (TokenDispatcher.permute).
        state_rows = x_ND.shape[0]
        x_RD = all_to_all_rows(x_ND[:sum(send_splits)], recv_splits, send_splits, self.ep_group)
        etp_splits = None
        if etp > 1:
            # All-gather over ETP (every ETP rank then computes its hidden shard of every row).
            etp_splits = [sum(rows_S[j * ep:(j + 1) * ep]) for j in range(etp)]
            x_RD = all_to_all_rows(x_RD.repeat(etp, 1), etp_splits, [x_RD.shape[0]] * etp,
                                   self.etp_group)
        order_N = _expert_major_order(counts_SL, sum(rows_S))
        if order_N is not None:
            x_RD = x_RD.index_select(0, order_N)
        state = ExchangeState(send_splits, recv_splits, etp_splits, order_N, state_rows)
        return x_RD, counts_SL.sum(0), state

    def exchange_back(self, y_ND: torch.Tensor, state: ExchangeState) -> torch.Tensor:
        if state.order_N is not None:  # expert-major -> the order the rows arrived in
            y_ND = torch.zeros_like(y_ND).index_copy(0, state.order_N, y_ND)
        if state.etp_splits is not None:
            # Reduce-scatter over ETP: each rank gets every ETP rank's partial output of its own
            # received rows and sums them (fixed order, fp32), i.e. the full hidden width.
            etp, n = self.etp_size, sum(state.recv_splits)
            parts = all_to_all_rows(y_ND, [n] * etp, state.etp_splits, self.etp_group)
            y_ND = parts.view(etp, n, -1).sum(0, dtype=torch.float32).to(y_ND.dtype)
        y_ND = all_to_all_rows(y_ND, state.send_splits, state.recv_splits, self.ep_group)
        return F.pad(y_ND, (0, 0, 0, state.rows - y_ND.shape[0]))  # back to every assignment


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


def apply_expert_parallel(model: nn.Module, experts_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's experts over the 2-D ("ep", "etp") `experts_mesh` (the MoE mesh's
    view, moetrain.parallel.mesh.Meshes.experts) and move their rows by all-to-all.

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
        layer.use_layout(exchange=AllToAllExchange(num_experts, ep_group, etp_group))
    return model


__all__ = ["AllToAllExchange", "ExchangeState", "all_to_all_rows", "apply_expert_parallel"]
