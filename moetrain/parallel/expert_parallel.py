"""Expert parallelism (EP) and expert tensor parallelism (ETP) for the MoE layers.

    apply_expert_parallel(model, ep_group, etp_group=None)   slice the experts, install the
                                                             all-to-all dispatcher
    distribute_expert_weights(model, expert_mesh)            the slices as DTensors (checkpoints,
                                                             FSDP, grad norm)

EP rank r holds experts [r E/ep, (r+1) E/ep); ETP rank s holds hidden columns
[s F/etp, (s+1) F/etp) of each. Capacity is decided before the exchange, on each rank's own
tokens. Layout, data flow, capacity and ETP rules: docs/expert_parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moetrain.model.moe.dispatcher import LocalDispatcher
from moetrain.model.moe.layer import moe_layers

GroupLike = Union[dist.ProcessGroup, DeviceMesh]


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


class AllToAllDispatcher(LocalDispatcher):
    """Dispatch to the experts of the EP group's ranks by all-to-all; drop-in for LocalDispatcher.

    `dispatch` returns the rows of this rank's L = E / ep local experts, expert-major, with
    tokens_per_expert [L]; `combine` returns this rank's own tokens. Dropless unless the routing
    carries a keep mask (capacity, decided per source rank before the exchange; see the module
    docstring); with `pad_to_capacity` the padded rows are exchanged too (static shapes).
    Experts and ranks with zero rows are fine (zero-size exchanges and GEMMs).

    `last_send_splits` / `last_recv_splits`: the rows the last dispatch sent to / received from
    each EP rank (host ints; for byte accounting and tests).
    """

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup,
        etp_group: Optional[dist.ProcessGroup] = None,
        pad_to_capacity: bool = False,
        kernels: str = "auto",
    ):
        super().__init__(num_experts, pad_to_capacity, kernels)
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        assert num_experts % self.ep_size == 0  # moetrain.parallel.checks
        self.num_local_experts = num_experts // self.ep_size
        self.etp_group = etp_group
        self.etp_size = 1 if etp_group is None else dist.get_world_size(etp_group)
        self.etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)
        self.last_send_splits: list[int] = []
        self.last_recv_splits: list[int] = []

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
        self.last_send_splits, self.last_recv_splits = send_splits, recv_splits

        # Only the kept rows travel; the dropped ones sort after them (LocalDispatcher.permute).
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


def _process_group(group: GroupLike) -> dist.ProcessGroup:
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"expected a 1-D mesh, got {group}")
        return group.get_group()
    return group


def apply_expert_parallel(
    model: nn.Module, ep_group: GroupLike, etp_group: Optional[GroupLike] = None
) -> nn.Module:
    """Shard every MoE layer's experts over EP (and ETP) and install the all-to-all dispatcher.

    Call on every rank with the same full model - on the meta device in the trainer, where the
    slicing allocates nothing and each rank initialises its shards afterwards - before FSDP /
    optimizer construction (the expert parameters are replaced). Groups: this rank's EP group
    and, for ETP > 1, its ETP group (process groups or 1-D device meshes). Returns the model,
    modified in place.
    """
    ep_group = _process_group(ep_group)
    etp_group = None if etp_group is None else _process_group(etp_group)
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    etp_size = 1 if etp_group is None else dist.get_world_size(etp_group)
    etp_rank = 0 if etp_group is None else dist.get_rank(etp_group)
    for layer in moe_layers(model):
        experts = layer.experts
        # Real experts only: null-expert routing slots (if any) never reach the dispatcher.
        E, F = experts.num_global_experts, experts.w1.shape[-1]
        if experts.num_local_experts != E or F != experts.global_hidden:
            raise RuntimeError("apply_expert_parallel: this model's experts are already sharded")
        assert E % ep_size == 0 and F % etp_size == 0  # moetrain.parallel.checks
        L, F_local = E // ep_size, F // etp_size
        experts.shard_(slice(ep_rank * L, (ep_rank + 1) * L),
                       slice(etp_rank * F_local, (etp_rank + 1) * F_local))
        layer.use_layout(dispatcher=AllToAllDispatcher(
            E, ep_group, etp_group if etp_size > 1 else None, layer.dispatcher.pad_to_capacity,
            layer.dispatcher.kernels))
    return model


def distribute_expert_weights(model: nn.Module, expert_mesh: DeviceMesh) -> nn.Module:
    """Turn the expert weights `apply_expert_parallel` sliced into DTensors on `expert_mesh`,
    the MoE mesh's 2-D ("ep", "etp") view: experts Shard(0) over ep, the hidden width F
    Shard over etp (w1, w3 dim 2, w2 dim 1). Call right after `apply_expert_parallel`.

    The sliced weights are plain [L, D, F/etp] tensors under the same names on every rank;
    as DTensors they carry the global [E, D, F] shape and each shard's offsets, so DCP saves
    every shard once and loads it into any other layout, the gradient norm counts each shard
    once (DTensor reduces the norm over ep x etp), and FSDP2 over the EDP ranks shards them
    further (2-D with the EP mesh, as TP weights are with dp_cp). The replicas on the EDP ranks
    are not part of the mesh: their gradients are summed by the data-parallel code.
    The forward computes with the local shards (`GroupedExperts` unwraps them).
    """
    if expert_mesh.ndim != 2:
        raise ValueError(f"expected the 2-D (ep, etp) mesh, got {expert_mesh}")
    for layer in moe_layers(model):
        experts = layer.experts
        for name, hidden_dim in (("w1", 2), ("w3", 2), ("w2", 1)):
            w = getattr(experts, name)
            if isinstance(w, DTensor):
                raise RuntimeError("distribute_expert_weights: the weights are DTensors already")
            shards = DTensor.from_local(w.detach(), expert_mesh, [Shard(0), Shard(hidden_dim)],
                                        run_check=False)
            setattr(experts, name, nn.Parameter(shards, requires_grad=w.requires_grad))
    return model


__all__ = ["AllToAllDispatcher", "ExchangeState", "all_to_all_rows", "apply_expert_parallel",
           "distribute_expert_weights"]
