"""Triton kernels of the MoE layer's memory-bound steps, with their autograd Functions.

    gather_rows   out[m] = scale[a] * src[a // k]  for a = slot[m] (0 where a = -1);
                  optionally dot[a] = <src[a // k], other[m]> in the same pass
                  (permute forward; unpermute backward: grad rows and grad weights at once)
    combine_rows  out[t] = sum_j w[t, j] * rows[pos[t, j]] over kept j, fp32, j in order
                  (unpermute forward; permute backward)
    swiglu_fwd    h = silu(a) * b;  swiglu_bwd  da, db from dh, a, b (silu recomputed)

No atomics: every output element is written by exactly one program and summed in a fixed
order, so results are deterministic and do not depend on the launch. All arithmetic is fp32;
loads and stores are in the tensors' own dtypes (fp32 or bf16).

This module imports triton; `moetrain.kernels` imports it only when a Triton path runs. With
TRITON_INTERPRET=1 in the environment before triton is first imported (Triton wraps its own
library functions, e.g. tl.sigmoid, at import), the kernels run on CPU tensors through Triton's
interpreter (the tests); otherwise they are compiled for the GPU. Only APIs present since
Triton 3.6 are used.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from moetrain.kernels.select import interpreter_enabled

# A program's tile: at most _MAX_COLS columns (a power of two) and rows filling _TILE elements:
# 4096 fp32 values in flight over 4 warps (32 per thread). Tests shrink both to cover many
# programs and ragged tails at small shapes.
_TILE = 4096
_MAX_COLS = 1024
_NUM_WARPS = 4


@triton.jit
def _gather_rows_kernel(src_ptr, slot_ptr, scale_ptr, out_ptr, other_ptr, dot_ptr,
                        M, D, stride_src, stride_out, stride_other,
                        TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_OUT: tl.constexpr,
                        HAS_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    valid = slot >= 0
    token = tl.where(valid, slot // TOP_K, 0)
    scale = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        src_mask = valid[:, None] & col_ok[None, :]
        v = tl.load(src_ptr + token[:, None] * stride_src + cols[None, :], mask=src_mask,
                    other=0.0).to(tl.float32)
        if WRITE_OUT:
            o = v
            if HAS_SCALE:
                o = v * scale[:, None]
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if HAS_DOT:
            r = tl.load(other_ptr + rows[:, None] * stride_other + cols[None, :], mask=src_mask,
                        other=0.0).to(tl.float32)
            dot += tl.sum(v * r, axis=1)
    if HAS_DOT:
        tl.store(dot_ptr + slot, dot, mask=valid)


@triton.jit
def _combine_rows_kernel(rows_ptr, pos_ptr, w_ptr, out_ptr, T, D, stride_rows, stride_out,
                         TOP_K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < T
    col_ok = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        a = tokens * TOP_K + j
        pos = tl.load(pos_ptr + a, mask=token_ok, other=-1).to(tl.int64)
        kept = pos >= 0
        r = tl.load(rows_ptr + pos[:, None] * stride_rows + cols[None, :],
                    mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + a, mask=kept, other=0.0).to(tl.float32)
            r = r * w[:, None]
        acc += r
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, N, F, stride_a, stride_b, stride_h,
                       BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, N, F, stride_g, stride_a, stride_b,
                       stride_da, stride_db, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    # d silu(a) / da = sig * (1 + a * (1 - sig))
    da = g * b * sig * (1.0 + a * (1.0 - sig))
    db = g * silu
    tl.store(da_ptr + rows[:, None] * stride_da + cols[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + rows[:, None] * stride_db + cols[None, :], db.to(db_ptr.dtype.element_ty), mask=mask)


def _blocks(width: int) -> tuple[int, int]:
    """(rows, columns) of a program's tile for rows of `width` elements."""
    cols = max(1, min(_MAX_COLS, triton.next_power_of_2(max(width, 1))))
    return max(1, _TILE // cols), cols


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension is contiguous (the kernels take a row stride)."""
    return t if t.dim() == 2 and t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, grid, *args, **meta) -> None:
    if interpreter_enabled():
        if isinstance(kernel, JITFunction):  # compiled-mode kernels cannot take CPU tensors
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; Triton reads "
                               "it at import: set it before (tests/conftest.py does)")
        kernel[grid](*args, **meta)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, num_warps=_NUM_WARPS, **meta)


# -- launchers ------------------------------------------------------------------------------------


def gather_rows(src_TD: torch.Tensor, slot_M: torch.Tensor, top_k: int,
                scale_A: Optional[torch.Tensor] = None, write_out: bool = True,
                dot_with_MD: Optional[torch.Tensor] = None,
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(out_MD, dot_A): out_MD[m] = scale_A[a] * src_TD[a // top_k] for a = slot_M[m] (zero row
    where a = -1; scale 1 without scale_A); dot_A[a] = <src_TD[a // top_k], dot_with_MD[m]>
    (fp32, zero for assignments no row holds) when dot_with_MD is given."""
    src_TD = _rows(src_TD)
    M, D = slot_M.shape[0], src_TD.shape[1]
    A = src_TD.shape[0] * top_k
    out = torch.empty(M, D, dtype=src_TD.dtype, device=src_TD.device) if write_out else None
    dot = None
    if dot_with_MD is not None:
        dot_with_MD = _rows(dot_with_MD)
        dot = torch.zeros(A, dtype=torch.float32, device=src_TD.device)
    if M == 0 or D == 0:
        return out, dot
    if src_TD.shape[0] == 0:  # no tokens: every row is padding
        return (None if out is None else out.zero_()), dot
    block_m, block_d = _blocks(D)
    if scale_A is not None:
        scale_A = scale_A.reshape(-1).contiguous()
    dummy = slot_M  # pointer arguments a constexpr flag leaves unused
    _launch(_gather_rows_kernel, (triton.cdiv(M, block_m),),
            src_TD, slot_M.contiguous(), dummy if scale_A is None else scale_A,
            dummy if out is None else out, dummy if dot_with_MD is None else dot_with_MD,
            dummy if dot is None else dot, M, D, src_TD.stride(0),
            0 if out is None else out.stride(0),
            0 if dot_with_MD is None else dot_with_MD.stride(0),
            TOP_K=top_k, HAS_SCALE=scale_A is not None, WRITE_OUT=write_out,
            HAS_DOT=dot is not None, BLOCK_M=block_m, BLOCK_D=block_d)
    return out, dot


def combine_rows(rows_MD: torch.Tensor, pos_TK: torch.Tensor,
                 weight_A: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_TD[t] = sum_j weight_A[t*k+j] * rows_MD[pos_TK[t, j]] over j with pos >= 0 (weight 1
    without weight_A), accumulated in fp32 in j order, stored in rows_MD's dtype."""
    rows_MD = _rows(rows_MD)
    T, K = pos_TK.shape
    D = rows_MD.shape[1]
    out = torch.empty(T, D, dtype=rows_MD.dtype, device=rows_MD.device)
    if T == 0 or D == 0:
        return out
    if rows_MD.shape[0] == 0:  # every assignment dropped
        return out.zero_()
    block_t, block_d = _blocks(D)
    if weight_A is not None:
        weight_A = weight_A.reshape(-1).contiguous()
    _launch(_combine_rows_kernel, (triton.cdiv(T, block_t), triton.cdiv(D, block_d)),
            rows_MD, pos_TK.contiguous(), pos_TK if weight_A is None else weight_A, out, T, D,
            rows_MD.stride(0), out.stride(0), TOP_K=K, HAS_W=weight_A is not None,
            BLOCK_T=block_t, BLOCK_D=block_d)
    return out


def swiglu_fwd(a_NF: torch.Tensor, b_NF: torch.Tensor) -> torch.Tensor:
    """silu(a) * b in a's dtype, computed in fp32."""
    a_NF, b_NF = _rows(a_NF), _rows(b_NF)
    N, F = a_NF.shape
    h = torch.empty(N, F, dtype=a_NF.dtype, device=a_NF.device)
    if N == 0 or F == 0:
        return h
    block_n, block_f = _blocks(F)
    _launch(_swiglu_fwd_kernel, (triton.cdiv(N, block_n), triton.cdiv(F, block_f)),
            a_NF, b_NF, h, N, F, a_NF.stride(0), b_NF.stride(0), h.stride(0),
            BLOCK_N=block_n, BLOCK_F=block_f)
    return h


def swiglu_bwd(g_NF: torch.Tensor, a_NF: torch.Tensor,
               b_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad a, grad b) of silu(a) * b for the output gradient g; silu recomputed from a."""
    g_NF, a_NF, b_NF = _rows(g_NF), _rows(a_NF), _rows(b_NF)
    N, F = a_NF.shape
    da = torch.empty(N, F, dtype=a_NF.dtype, device=a_NF.device)
    db = torch.empty(N, F, dtype=b_NF.dtype, device=b_NF.device)
    if N == 0 or F == 0:
        return da, db
    block_n, block_f = _blocks(F)
    _launch(_swiglu_bwd_kernel, (triton.cdiv(N, block_n), triton.cdiv(F, block_f)),
            g_NF, a_NF, b_NF, da, db, N, F, g_NF.stride(0), a_NF.stride(0), b_NF.stride(0),
            da.stride(0), db.stride(0), BLOCK_N=block_n, BLOCK_F=block_f)
    return da, db


# -- autograd -------------------------------------------------------------------------------------


class Permute(torch.autograd.Function):
    """x_TD [T, D] -> x_MD [M, D]; backward sums each token's k row gradients (combine_rows)."""

    @staticmethod
    def forward(ctx, x_TD, slot_M, pos_TK):
        ctx.save_for_backward(pos_TK)
        out, _ = gather_rows(x_TD, slot_M, pos_TK.shape[1])
        return out

    @staticmethod
    def backward(ctx, grad_MD):
        (pos_TK,) = ctx.saved_tensors
        return combine_rows(grad_MD, pos_TK), None, None


class Unpermute(torch.autograd.Function):
    """rows_MD [M, D], weight_TK [T, k] -> y_TD [T, D]. Saves rows_MD (in its own dtype) for the
    weight gradient; backward is one gather_rows pass: grad rows = w * grad_y[token], and
    grad w = <grad_y[token], row> from the same loaded grad_y row."""

    @staticmethod
    def forward(ctx, rows_MD, weight_TK, slot_M, pos_TK):
        ctx.save_for_backward(rows_MD, weight_TK, slot_M)
        return combine_rows(rows_MD, pos_TK, weight_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        rows_MD, weight_TK, slot_M = ctx.saved_tensors
        need_rows, need_w = ctx.needs_input_grad[:2]
        if not (need_rows or need_w):
            return None, None, None, None
        T, K = weight_TK.shape
        grad_rows, grad_w = gather_rows(grad_TD, slot_M, K, scale_A=weight_TK,
                                        write_out=need_rows,
                                        dot_with_MD=rows_MD if need_w else None)
        if grad_w is not None:
            grad_w = grad_w.view(T, K).to(weight_TK.dtype)
        return grad_rows, grad_w, None, None


class SwiGLU(torch.autograd.Function):
    """h = silu(a) * b; saves a and b only (silu and sigmoid are recomputed in backward)."""

    @staticmethod
    def forward(ctx, a_NF, b_NF):
        ctx.save_for_backward(a_NF, b_NF)
        return swiglu_fwd(a_NF, b_NF)

    @staticmethod
    def backward(ctx, grad_NF):
        a_NF, b_NF = ctx.saved_tensors
        da, db = swiglu_bwd(grad_NF, a_NF, b_NF)
        return da, db
