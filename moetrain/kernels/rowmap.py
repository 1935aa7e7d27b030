"""Where each routed assignment lives in the expert-grouped row buffer, both ways round.

An assignment is a (token t, choice j) pair, flat index a = t * k + j. The dispatcher sorts the
kept assignments by expert (`slot_N`, as `TokenDispatcher.permute` builds it) and, with static
capacity, places them in a zero-padded buffer of E * C rows (`rows_N`). The kernels need both
directions: buffer row -> assignment (to gather rows forward) and assignment -> buffer row (to
sum a token's k rows without atomics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RowMap:
    """Both directions of the assignment <-> buffer-row mapping.

    slot_M  [M] int64   assignment held by buffer row m; -1 for a padding row
    pos_TK  [T, k] int64  buffer row of assignment (t, j); -1 where it was dropped
    padded  whether the buffer can hold padding rows (static capacity); known without reading
            the device, so the PyTorch path skips the masking when it is False
    """

    slot_M: torch.Tensor
    pos_TK: torch.Tensor
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.pos_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.pos_TK.shape[1]

    @property
    def num_rows(self) -> int:
        return self.slot_M.shape[0]


def build_row_map(slot_N: torch.Tensor, num_tokens: int, top_k: int,
                  rows_N: Optional[torch.Tensor] = None,
                  num_rows: Optional[int] = None) -> RowMap:
    """RowMap of the N kept assignments `slot_N` (flat t * k + j, in buffer order).

    Without `rows_N` the buffer holds exactly those N rows (row i is assignment slot_N[i]);
    with it, assignment slot_N[i] sits at row rows_N[i] of a buffer of `num_rows` rows and the
    other rows are padding. Raises ValueError on inconsistent arguments. Two small integer
    scatters: no host synchronisation.
    """
    if slot_N.dim() != 1:
        raise ValueError(f"slot_N must be 1-D, got shape {tuple(slot_N.shape)}")
    if num_tokens < 0 or top_k < 1:
        raise ValueError(f"num_tokens must be >= 0 and top_k >= 1, got {num_tokens}, {top_k}")
    device = slot_N.device
    padded = rows_N is not None
    slot_N = slot_N.long()
    n = slot_N.shape[0]
    if rows_N is None:
        if num_rows is not None and num_rows != n:
            raise ValueError(f"num_rows={num_rows} but slot_N has {n} entries and no rows_N")
        slot_M = slot_N
        rows_N = torch.arange(n, device=device)
    else:
        if num_rows is None:
            raise ValueError("rows_N needs num_rows (the padded buffer's row count)")
        if rows_N.shape != slot_N.shape:
            raise ValueError(f"rows_N shape {tuple(rows_N.shape)} != slot_N shape {tuple(slot_N.shape)}")
        rows_N = rows_N.long()
        slot_M = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        slot_M = slot_M.scatter(0, rows_N, slot_N)
    pos_A = torch.full((num_tokens * top_k,), -1, dtype=torch.long, device=device)
    pos_A = pos_A.scatter(0, slot_N, rows_N)
    return RowMap(slot_M, pos_A.view(num_tokens, top_k), padded=padded)
