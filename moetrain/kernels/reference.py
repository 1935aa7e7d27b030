"""The PyTorch path of every kernel: what runs where Triton does not, and what the tests hold the
Triton kernels to. Differentiable through autograd; same shapes and dtypes as the kernels.

Precision differs in one place: `unpermute` here rounds nothing before the fp32 sum either
(weights applied in fp32, one rounding at the end), like the kernel; `TokenDispatcher.unpermute`
rounds each weighted row to the activation dtype first, so in bf16 it can differ from both by
one bf16 rounding of each addend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrain.kernels.rowmap import RowMap


def permute(x_TD: torch.Tensor, row_map: RowMap) -> torch.Tensor:
    """x_MD[m] = x_TD[slot_M[m] // k]; padding rows (slot -1) are zero. [T, D] -> [M, D]."""
    slot_M = row_map.slot_M
    if x_TD.shape[0] == 0:  # no tokens: every row is padding (keeps x in the graph)
        return x_TD.new_zeros(slot_M.shape[0], x_TD.shape[1]) + x_TD.sum()
    if not row_map.padded:
        return x_TD.index_select(0, torch.div(slot_M, row_map.top_k, rounding_mode="floor"))
    token_M = torch.div(slot_M.clamp_min(0), row_map.top_k, rounding_mode="floor")
    x_MD = x_TD.index_select(0, token_M)
    return torch.where((slot_M >= 0).unsqueeze(1), x_MD, x_MD.new_zeros(()))


def unpermute(rows_MD: torch.Tensor, weight_TK: torch.Tensor, row_map: RowMap) -> torch.Tensor:
    """y_TD[t] = sum_j [pos_TK[t, j] >= 0] * weight_TK[t, j] * rows_MD[pos_TK[t, j]].

    fp32 products and sum, in j order, one rounding to rows_MD's dtype. Gradients flow to
    rows_MD and weight_TK (d weight[t, j] = <grad_y[t], rows(t, j)>). [M, D] -> [T, D].
    """
    pos_TK = row_map.pos_TK
    T, K = pos_TK.shape
    if rows_MD.shape[0] == 0:  # every assignment dropped (keeps both inputs in the graph)
        zero = (rows_MD.float().sum() + weight_TK.float().sum() * 0).to(rows_MD.dtype)
        return rows_MD.new_zeros(T, rows_MD.shape[1]) + zero
    kept_TK = pos_TK >= 0
    rows_TKD = rows_MD.index_select(0, pos_TK.clamp_min(0).reshape(-1)).view(T, K, -1)
    w_TK = torch.where(kept_TK, weight_TK.float(), weight_TK.new_zeros((), dtype=torch.float32))
    y_TD = (rows_TKD.float() * w_TK.unsqueeze(-1)).sum(1)
    return y_TD.to(rows_MD.dtype)


def swiglu(a_NF: torch.Tensor, b_NF: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, elementwise (Shazeer 2020, "GLU Variants Improve Transformer")."""
    return F.silu(a_NF) * b_NF
