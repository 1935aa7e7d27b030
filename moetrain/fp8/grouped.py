"""The routed experts' grouped GEMMs in FP8: `GroupedGemm`s for `GroupedExperts.use_gemm`.

    gemm = grouped_gemm(plan)          # Float8RowwiseGemm or MXFP8Gemm
    y_NO = gemm(x_NK, w_EKO, offsets_E)

Each GEMM of the experts' forward and backward quantizes both operands to float8 e4m3
(max 448) along its reduction dimension and multiplies them (torchao.prototype.moe_training):

    rowwise   (train.fp8=rowwise, and the experts of tensorwise: torchao has no per-tensor
              grouped GEMM, and one scale over every expert would let one expert's outlier
              flatten the others) - one power-of-two scale per row of the left operand and per
              column of each expert's weight: forward x per row (over K), w per (expert,
              column) (over K); input gradient dy per row (over O), w per (expert, row) (over
              O); weight gradient x and dy per (group, column) over the group's rows.
    mxfp8     one power-of-two (e8m0) scale per 32 consecutive elements along the reduction
              dimension (OCP MX, RCEIL rounding: 2^ceil(log2(amax / 448))).

On an NVIDIA GPU these are torchao's kernels (Hopper: FP8 rowwise, Blackwell: MXFP8). On the CPU
they are emulated: the operands quantized as the kernel does (torchao's own torch quantizers:
tensor_to_scale / to_fp8_saturated, to_mx), dequantized, and multiplied by grouped_mm in the
run's precision (products of e4m3 values are exact in fp32; only the accumulation order differs
from a kernel). torchao's FP8 rowwise grouped GEMM has no CPU route (its quantizers are Triton
kernels, torch._scaled_grouped_mm is CUDA-only); its MXFP8 EMULATED path multiplies in bf16,
so in an fp32 run its output is rounded to bf16 - and under ETP each rank's partial sum would
be rounded before the sum, unlike one process's. Groups must be multiples of
`group_multiple` rows (the kernels' alignment; GroupedExperts pads them): MXFP8's weight
gradient quantizes 32-row blocks along the tokens, which must not straddle two experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetrain.fp8.plan import FP8Plan

E4M3 = torch.float8_e4m3fn
MX_BLOCK = 32  # elements per MXFP8 scale


def _column_major(w_EKO: torch.Tensor) -> torch.Tensor:
    """The same [E, K, O] values with strides (K*O, 1, K): the layout torchao's grouped GEMMs
    require of the right operand (moetrain stores the experts row-major, [E, D, F])."""
    return w_EKO.transpose(-2, -1).contiguous().transpose(-2, -1)


def _contiguous_grad(out: torch.Tensor) -> torch.Tensor:
    # torchao's backward quantizes the incoming gradient in place of a view: make it dense.
    if out.requires_grad:
        out.register_hook(torch.Tensor.contiguous)
    return out


# -- the emulations ------------------------------------------------------------------------------


def fake_quantize(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t quantized to e4m3 with one power-of-two scale per slice along `dim` (the amax over
    `dim`), dequantized to fp32 (torchao's tensor_to_scale / to_fp8_saturated)."""
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    scale = tensor_to_scale(t, E4M3, scaling_granularity=ScalingGranularity.AXISWISE,
                            axiswise_dim=dim, round_scales_to_power_of_2=True)
    return to_fp8_saturated(t.float() * scale, E4M3).float() / scale


def fake_quantize_group_columns(t_NC: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """t quantized to e4m3 with one power-of-two scale per (group, column): the amax over the
    group's rows (groups by `offsets_E`; rows past the last offset form a group of their own),
    dequantized to fp32. On the device, without reading the offsets (torchao's torch version,
    torch_to_float8_per_group_colwise, loops over the groups on the host)."""
    from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

    N, C = t_NC.shape
    E = offsets_E.shape[0]
    group_N = torch.searchsorted(offsets_E, torch.arange(N, device=t_NC.device, dtype=torch.int32),
                                 right=True)
    amax_GC = torch.zeros(E + 1, C, dtype=torch.float32, device=t_NC.device).scatter_reduce(
        0, group_N[:, None].expand(N, C), t_NC.abs().float(), "amax")
    scale_NC = amax_to_scale(amax_GC, E4M3, round_scales_to_power_of_2=True)[group_N]
    return to_fp8_saturated(t_NC.float() * scale_NC, E4M3).float() / scale_NC


def fake_quantize_mx(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t quantized to MXFP8 (e4m3, one e8m0 scale per 32 elements along `dim`, RCEIL: torchao's
    to_mx), dequantized to fp32."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    moved = t.movedim(dim, -1).contiguous()
    scale, data = to_mx(moved, E4M3, MX_BLOCK, ScaleCalculationMode.RCEIL)
    deq = to_dtype(data, scale, E4M3, MX_BLOCK, torch.float32).reshape(moved.shape)
    return deq.movedim(-1, dim)


class _MXFP8Emulated(torch.autograd.Function):
    """torchao's _MXFP8GroupedMM (RCEIL, weight gradient in MXFP8) with the GEMMs in fp32 on the
    dequantized operands: blocks along K in the forward, along O for the input gradient, along
    the (32-aligned) groups' rows for the weight gradient."""

    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_EKO: torch.Tensor,
                offsets_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_NK, w_EKO, offsets_E)
        out = F.grouped_mm(fake_quantize_mx(x_NK, -1), fake_quantize_mx(w_EKO, -2),
                           offs=offsets_E)
        return out.to(x_NK.dtype)

    @staticmethod
    def backward(ctx, dy_NO: torch.Tensor):
        x_NK, w_EKO, offsets_E = ctx.saved_tensors
        wq_EOK = fake_quantize_mx(w_EKO, -1).transpose(-2, -1)
        dx_NK = F.grouped_mm(fake_quantize_mx(dy_NO, -1), wq_EOK, offs=offsets_E)
        dw_EKO = F.grouped_mm(fake_quantize_mx(x_NK, 0).t(), fake_quantize_mx(dy_NO, 0),
                              offs=offsets_E)
        return dx_NK.to(x_NK.dtype), dw_EKO.to(w_EKO.dtype), None


class _RowwiseEmulated(torch.autograd.Function):
    """torchao's _Float8GroupedMM with its operands quantized as the kernel does and the GEMMs
    in fp32 on the dequantized values (module docstring)."""

    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_EKO: torch.Tensor,
                offsets_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_NK, w_EKO, offsets_E)
        out = F.grouped_mm(fake_quantize(x_NK, -1), fake_quantize(w_EKO, -2), offs=offsets_E)
        return out.to(x_NK.dtype)

    @staticmethod
    def backward(ctx, dy_NO: torch.Tensor):
        x_NK, w_EKO, offsets_E = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        # dx = dy @ w^T: dy per row over O, w per (expert, row k) over O.
        wq_EOK = fake_quantize(w_EKO, -1).transpose(-2, -1)
        dx_NK = F.grouped_mm(fake_quantize(dy_NO, -1), wq_EOK, offs=offsets_E)
        # dw[e] = x_e^T @ dy_e: both per (group, column) over the group's rows.
        xq_NK = fake_quantize_group_columns(x_NK, offsets_E)
        dyq_NO = fake_quantize_group_columns(dy_NO, offsets_E)
        dw_EKO = F.grouped_mm(xq_NK.t(), dyq_NO, offs=offsets_E)
        return dx_NK.to(x_NK.dtype), dw_EKO.to(w_EKO.dtype), None


# -- the GEMMs ----------------------------------------------------------------------------------


class _FP8GroupedGemm:
    """A grouped GEMM y_NO = x_NK @ w_EKO per expert group (`offsets_E`): torchao's kernel
    (`_kernel`, bf16 out, cast back to x's dtype), or its emulation (`_emulated`) on the CPU."""

    group_multiple: int  # rows per group the kernel requires (GroupedExperts pads to it)
    _emulated: type[torch.autograd.Function]

    def __init__(self, emulate: bool):
        self.emulate = emulate

    def __call__(self, x_NK: torch.Tensor, w_EKO: torch.Tensor,
                 offsets_E: torch.Tensor) -> torch.Tensor:
        if self.emulate:
            return _contiguous_grad(self._emulated.apply(x_NK, w_EKO, offsets_E))
        out = self._kernel(x_NK.contiguous(), _column_major(w_EKO), offsets_E)
        return _contiguous_grad(out.to(x_NK.dtype))

    def _kernel(self, x_NK: torch.Tensor, w_EKO: torch.Tensor,
                offsets_E: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(emulate={self.emulate})"


class Float8RowwiseGemm(_FP8GroupedGemm):
    """FP8 rowwise grouped GEMM (module docstring): torchao's kernel, or emulated."""

    group_multiple = 16
    _emulated = _RowwiseEmulated

    def _kernel(self, x_NK, w_EKO, offsets_E):
        from torchao.prototype.moe_training.fp8_grouped_mm import (
            _to_fp8_rowwise_then_scaled_grouped_mm,
        )

        return _to_fp8_rowwise_then_scaled_grouped_mm(
            x_NK, w_EKO, offsets_E, out_dtype=torch.bfloat16, float8_dtype=E4M3,
            pad_token_groups_for_grouped_mm=False)


class MXFP8Gemm(_FP8GroupedGemm):
    """MXFP8 grouped GEMM (module docstring): torchao's with its Blackwell kernels, or
    emulated."""

    group_multiple = 32
    _emulated = _MXFP8Emulated

    def _kernel(self, x_NK, w_EKO, offsets_E):
        from torchao.prototype.moe_training.mxfp8_grouped_mm import (
            _to_mxfp8_then_scaled_grouped_mm,
        )
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.quantization.quantize_.common import KernelPreference

        return _to_mxfp8_then_scaled_grouped_mm(
            x_NK, w_EKO, offsets_E, out_dtype=torch.bfloat16,
            kernel_preference=KernelPreference.AUTO,
            scale_calculation_mode=ScaleCalculationMode.RCEIL,
            pad_token_groups_for_grouped_mm=False)


def grouped_gemm(plan: FP8Plan):
    """The routed experts' GEMM of `plan`'s recipe (torchao's grouped GEMMs under either
    backend: Transformer Engine's GroupedLinear needs the split sizes on the host)."""
    if plan.recipe == "mxfp8":
        return MXFP8Gemm(plan.emulate)
    return Float8RowwiseGemm(plan.emulate)


__all__ = ["Float8RowwiseGemm", "MXFP8Gemm", "fake_quantize", "fake_quantize_group_columns",
           "fake_quantize_mx", "grouped_gemm"]
