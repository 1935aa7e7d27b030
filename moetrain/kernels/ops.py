"""The kernels' public functions: each runs the Triton kernel or the PyTorch path, as
`kernels` (the `model.moe.kernels` setting) and the tensor's device select (select.py).

Shapes: T tokens, k experts per token, D model dim, M rows of the expert-grouped buffer
(kept assignments, plus padding rows under static capacity), N rows and F hidden width of an
expert GEMM's output. Dtypes: fp32 or bf16 activations (fp32 accumulation in both paths),
fp32 routing weights.
"""

from __future__ import annotations

import torch

from moetrain.kernels import reference
from moetrain.kernels.rowmap import RowMap
from moetrain.kernels.select import choose


def _check_rows(name: str, t: torch.Tensor, rows: int, what: str) -> None:
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"{name} must be [{what}, D] with {what} = {rows}, got {tuple(t.shape)}")


def permute(x_TD: torch.Tensor, row_map: RowMap, kernels: str = "auto") -> torch.Tensor:
    """Token rows in expert-grouped order: x_MD[m] = x_TD[slot_M[m] // k] (padding rows 0).

    [T, D] -> [M, D]. Backward: grad_x[t] = sum over t's kept assignments j of
    grad_x_MD[pos_TK[t, j]], summed in j order in fp32 (deterministic, no atomics).
    """
    _check_rows("x_TD", x_TD, row_map.num_tokens, "T")
    if choose(kernels, "permute", x_TD) == "torch":
        return reference.permute(x_TD, row_map)
    from moetrain.kernels.triton_ops import Permute

    return Permute.apply(x_TD, row_map.slot_M, row_map.pos_TK)


def unpermute(rows_MD: torch.Tensor, weight_TK: torch.Tensor, row_map: RowMap,
              kernels: str = "auto") -> torch.Tensor:
    """Each token's weighted sum of its expert rows (the MoE combine):

        y_TD[t] = sum_j [pos_TK[t, j] >= 0] * weight_TK[t, j] * rows_MD[pos_TK[t, j]]

    [M, D], [T, k] -> [T, D] in rows_MD's dtype; products and sum in fp32, j in order, one
    rounding. Backward: grad rows_MD[m] = weight(a) * grad_y[t] and grad weight_TK[t, j] =
    <grad_y[t], rows(t, j)> for the assignment a = (t, j) of row m (0 for padding rows and
    dropped assignments).
    """
    _check_rows("rows_MD", rows_MD, row_map.num_rows, "M")
    if weight_TK.shape != row_map.pos_TK.shape:
        raise ValueError(f"weight_TK must be [T, k] = {tuple(row_map.pos_TK.shape)}, "
                         f"got {tuple(weight_TK.shape)}")
    if choose(kernels, "unpermute", rows_MD) == "torch":
        return reference.unpermute(rows_MD, weight_TK, row_map)
    from moetrain.kernels.triton_ops import Unpermute

    return Unpermute.apply(rows_MD, weight_TK, row_map.slot_M, row_map.pos_TK)


def swiglu(a_NF: torch.Tensor, b_NF: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """silu(a) * b for the gate (a = x w1) and up (b = x w3) projections, [N, F] -> [N, F].

    a and b may be row-strided views (e.g. the two halves of one [N, 2F] GEMM output). The
    Triton kernel saves only a and b for backward and recomputes silu there.
    """
    if a_NF.shape != b_NF.shape or a_NF.dim() != 2:
        raise ValueError(f"a_NF and b_NF must be [N, F] of one shape, got {tuple(a_NF.shape)} "
                         f"and {tuple(b_NF.shape)}")
    if choose(kernels, "swiglu", a_NF) == "torch":
        return reference.swiglu(a_NF, b_NF)
    from moetrain.kernels.triton_ops import SwiGLU

    return SwiGLU.apply(a_NF, b_NF)
