"""Random routings for the kernel tests: top-k over E experts with some experts never chosen,
some assignments dropped, optionally a capacity-padded buffer; the kept assignments are sorted
by expert the way the dispatcher does (stable, token order within an expert)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moetrain.kernels import RowMap, build_row_map


@dataclass
class Routing:
    row_map: RowMap
    weight_TK: torch.Tensor  # fp32
    counts_E: torch.Tensor  # kept rows per expert (before padding)
    slot_N: torch.Tensor
    rows_N: Optional[torch.Tensor]


def make_routing(T: int, K: int, E: int, device, drop: float = 0.2, empty=(1,),
                 padded: bool = False) -> Routing:
    scores_TE = torch.rand(T, E, device=device)
    scores_TE[:, list(empty)] = -1.0  # these experts get no token
    idx_TK = scores_TE.topk(K, dim=1).indices
    keep_A = torch.rand(T * K, device=device) >= drop
    slot_A = torch.arange(T * K, device=device)[keep_A]
    expert_A = idx_TK.reshape(-1)[slot_A]
    order = torch.argsort(expert_A, stable=True)
    slot_N, expert_N = slot_A[order], expert_A[order]
    counts_E = torch.bincount(expert_N, minlength=E)
    rows_N = num_rows = None
    if padded:  # every expert gets C rows, C above the largest load: padding everywhere
        C = int(counts_E.max()) + 2 if len(slot_N) else 2
        start_E = torch.cumsum(counts_E, 0) - counts_E
        rows_N = expert_N * C + torch.arange(len(slot_N), device=device) - start_E[expert_N]
        num_rows = E * C
    weight_TK = torch.rand(T, K, device=device) + 0.1
    row_map = build_row_map(slot_N, T, K, rows_N, num_rows)
    return Routing(row_map, weight_TK, counts_E, slot_N, rows_N)
