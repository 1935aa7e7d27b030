"""Routed SwiGLU experts with stacked weights, computed by a grouped GEMM or a per-expert loop.

    out[n] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]   for row n of expert e's group

Weights: w1_EDF, w3_EDF [E, D, F], w2_EFD [E, F, D]; rows of x arrive grouped by expert with
`tokens_per_expert` rows each; rows after the last group (dropped assignments) are not computed
and their output is undefined (the dispatcher masks them). Under expert (tensor) parallelism the
weights are DTensors of the global shape and the GEMMs use this rank's shard: E is then the local
expert count and F the local width, both read from the shard.

The grouped GEMM (`torch.nn.functional.grouped_mm`) is the default wherever it runs: on CPU in
fp32 it is bit-identical to the loop (same per-group GEMMs) and faster (no per-expert Python
launch, no host sync for the split sizes; ~5x at 64 experts). The loop is the reference, and
the fallback for dtypes/devices/shapes grouped_mm refuses (probed once per device and dtype).

The grouped GEMM is also the swap point of the experts' numerics: `GroupedExperts.use_gemm`
replaces it by another `GroupedGemm` (FP8: moetrain/fp8/grouped.py), which computes the same
product from quantized operands. A GEMM that needs every group's row count to be a multiple of
its `group_multiple` (the FP8 kernels' alignment) gets the rows padded with zero rows per group
(`pad_groups`), once for the three GEMMs, on the device (no host sync).

An expert's output rows depend only on that expert's rows (each group is its own GEMM), so the
dispatcher may compute the experts in pieces (`first_expert`: a range of the local experts) or
with padding rows after the counted ones and get the same bits - except that ATen's CPU
elementwise kernels round the last partial vector of a tensor with scalar libm instead of SLEEF:
the SiLU runs on a whole number of vectors on the CPU (`_silu`) so its bits do not depend on
where a row sits.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain import kernels

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_probe_results: dict[tuple[str, torch.dtype], bool] = {}


def _gmm(x_ND: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out = _grouped_mm(x_ND, w_EIO, offs=offsets_E)
    if out.requires_grad:
        # grouped_mm's backward needs a contiguous incoming gradient. A tensor hook rather than
        # an identity autograd.Function: that would make the output a view, which FSDP2 warns
        # about when the experts are their own FSDP unit (expert parallelism).
        out.register_hook(torch.Tensor.contiguous)
    return out


def grouped_mm_usable(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    if _grouped_mm is None or x_ND.shape[0] == 0:
        return False
    # 16-byte aligned strides are required.
    if any((w.shape[-1] * w.element_size()) % 16 for w in weights) or any(
        (w.shape[-2] * w.element_size()) % 16 for w in weights
    ):
        return False
    key = (x_ND.device.type, x_ND.dtype)
    if key not in _probe_results:
        # The probe runs real tensors: under torch.compile it runs eagerly, once (a graph break
        # on the first trace only; an eager forward before compiling avoids even that).
        _probe_results[key] = torch.compiler.disable(_probe)(x_ND.device, x_ND.dtype)
    return _probe_results[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    # The first call can come from inside an activation-checkpointed forward: the identity
    # saved-tensor hooks keep the probe's own tensors out of the checkpoint's bookkeeping
    # (else the recompute, which finds the probe cached, saves fewer tensors and fails).
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            x = torch.ones(16, 16, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
            _gmm(x, w, offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a weight. Under expert parallelism the weights are DTensors with
    the global [E, D, F] shape (for checkpoints and FSDP); the rows a rank receives depend on
    the routing, which a DTensor cannot express, so the GEMMs use the local shard (as
    torchtitan's GroupedExperts do)."""
    return w.to_local() if isinstance(w, DTensor) else w


def experts_loop(x_ND, tokens_per_expert_E, w1_EDF, w3_EDF, w2_EFD) -> torch.Tensor:
    """Reference: one SwiGLU per expert over its slice of rows; rows after the experts' counts
    (assignments the dispatcher did not keep) come out as zeros. Reads the counts on the host."""
    splits = tokens_per_expert_E.tolist()
    outs = []
    for e, x_nD in enumerate(torch.split(x_ND[:sum(splits)], splits)):
        h_nF = F.silu(x_nD @ w1_EDF[e]) * (x_nD @ w3_EDF[e])
        outs.append(h_nF @ w2_EFD[e])
    rest = x_ND.shape[0] - sum(splits)
    outs.append(x_ND.new_zeros(rest, w2_EFD.shape[-1]))
    return torch.cat(outs)


class GroupedGemm(Protocol):
    """One grouped GEMM of the routed experts: gemm(x [N, K], w [E, K, O], offsets [E] int32)
    -> [N, O], rows offsets[e-1]:offsets[e] (offsets[-1] = 0) times w[e]; rows past the last
    offset are not computed (undefined). Every group's row count must be a multiple of
    `group_multiple` (1: any; a GEMM without the attribute takes any). Implementations: torch's
    grouped_mm (high precision, the default; `_grouped_mm_op` under torch.compile outside bf16)
    and the FP8 recipes of moetrain/fp8/grouped.py."""

    group_multiple: int

    def __call__(self, x_NK: torch.Tensor, w_EKO: torch.Tensor,
                 offsets_E: torch.Tensor) -> torch.Tensor: ...


def pad_groups(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, multiple: int):
    """Rows of x grouped by expert -> every group padded with zero rows to a multiple of
    `multiple`: (x_MD, offsets_E int32 of the padded groups, rows_N: where row n went, valid_N:
    rows within the experts' counts). M = a static bound (N + E * (multiple - 1), rounded up
    to `multiple`), so nothing is read on the host; rows of x past the counts go after the last
    padded group (not computed)."""
    N, E = x_ND.shape[0], tokens_per_expert_E.shape[0]
    counts_E = tokens_per_expert_E.to(torch.int64)
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    ends_E, padded_ends_E = torch.cumsum(counts_E, 0), torch.cumsum(padded_E, 0)
    n_N = torch.arange(N, device=x_ND.device)
    group_N = torch.searchsorted(ends_E, n_N, right=True)  # E for rows past the counts
    valid_N = group_N < E
    g_N = group_N.clamp(max=E - 1)
    inside_N = n_N - (ends_E - counts_E)[g_N] + (padded_ends_E - padded_E)[g_N]
    rows_N = torch.where(valid_N, inside_N, padded_ends_E[-1] + n_N - ends_E[-1])
    M = -(-(N + E * (multiple - 1)) // multiple) * multiple
    # Rows past the counts enter as zeros: no gradient reaches them (a GEMM leaves its rows past
    # the last offset undefined, in the backward too).
    x_MD = x_ND.new_zeros(M, x_ND.shape[1]).index_copy(
        0, rows_N, torch.where(valid_N[:, None], x_ND, 0))
    return x_MD, padded_ends_E.to(torch.int32), rows_N, valid_N


# ATen's CPU elementwise loops take 2 vectors per step and leave the rest (< 2 vectors) to the
# scalar function; for SiLU that is libm's exp instead of SLEEF's, which can round differently.
# Elements per step, with room for any CPU vector width (AVX-512 fp32: 32, bf16: 64).
_CPU_VECTOR_STEP = 128


def _silu(a: torch.Tensor) -> torch.Tensor:
    """SiLU whose value at an element does not depend on the tensor around it: on the CPU the
    input is padded to whole vector steps (a copy, only when it is not already), so every element
    takes the vectorised path, in forward and backward."""
    n = a.numel()
    if a.device.type != "cpu" or n % _CPU_VECTOR_STEP == 0:
        return F.silu(a)
    flat = F.pad(a.reshape(-1), (0, -n % _CPU_VECTOR_STEP))
    return F.silu(flat)[:n].view(a.shape)


def experts_grouped(x_ND, tokens_per_expert_E, w1_EDF, w3_EDF, w2_EFD,
                    kernel: str = "torch", gmm: Optional[GroupedGemm] = None) -> torch.Tensor:
    """The grouped-GEMM path; `kernel` picks the SwiGLU between the GEMMs (moetrain.kernels),
    `gmm` the grouped GEMM (`GroupedGemm`; default: torch's, with a contiguous incoming
    gradient). A GEMM that needs aligned groups gets them padded (`pad_groups`)."""
    gmm = gmm or _gmm
    multiple = getattr(gmm, "group_multiple", 1)
    if multiple > 1:
        x_MD, offsets_E, rows_N, valid_N = pad_groups(x_ND, tokens_per_expert_E, multiple)
        y_MD = _swiglu_experts(x_MD, offsets_E, w1_EDF, w3_EDF, w2_EFD, kernel, gmm)
        # Rows past the counts were not computed: zeros, like the other paths' unused rows.
        return torch.where(valid_N[:, None], y_MD.index_select(0, rows_N), 0)
    offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    return _swiglu_experts(x_ND, offsets_E, w1_EDF, w3_EDF, w2_EFD, kernel, gmm)


def _swiglu_experts(x_ND, offsets_E, w1_EDF, w3_EDF, w2_EFD, kernel, gmm):
    a_NF, b_NF = gmm(x_ND, w1_EDF, offsets_E), gmm(x_ND, w3_EDF, offsets_E)
    h_NF = _silu(a_NF) * b_NF if kernel == "torch" else kernels.swiglu(a_NF, b_NF, kernel)
    return gmm(h_NF, w2_EFD, offsets_E)


# An FP8 GEMM outside bf16 runs eagerly under torch.compile (the graph break the high-precision
# GEMM had before its custom op; the FP8 emulation itself refuses compile, moetrain/fp8/plan.py).
_experts_grouped_eager = torch.compiler.disable(experts_grouped)


# torch.compile traces aten's grouped_mm only in bf16 (its shape function refuses other dtypes,
# which the CPU kernel runs): for the others, a custom op the compiler treats as opaque - the
# same kernel, with aten's backward formulas (dX = dY W^T, dW = X^T dY per group).
@torch.library.custom_op("moetrain::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(x, w, offs=offs)


@_grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moetrain::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm(x.t(), grad, offs=offs)


@_grouped_mm_wgrad.register_fake
def _(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _gmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gmm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    return (_grouped_mm_op(grad, w.transpose(-2, -1), offs), _grouped_mm_wgrad(x, grad, offs),
            None)


_grouped_mm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)


class GroupedExperts(nn.Module):
    """E routed SwiGLU experts of width F over model width D: w1, w3 [E, D, F], w2 [E, F, D]
    (module docstring); forward(x [N, D], tokens_per_expert [E]) -> [N, D]."""

    def __init__(self, num_experts: int, dim: int, hidden: int,
                 use_grouped_mm: Optional[bool] = None, kernels: str = "auto"):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        # None = grouped GEMM when usable, else the loop; True/False force one (True raises
        # inside grouped_mm where it does not run).
        self.use_grouped_mm = use_grouped_mm
        self.kernels = kernels  # model.moe.kernels, for the SwiGLU
        # Another grouped GEMM than grouped_mm (`use_gemm`: FP8 recipes); None = high precision.
        self.gemm: Optional[GroupedGemm] = None

    def use_gemm(self, gemm: Optional[GroupedGemm]) -> None:
        """Compute the three expert GEMMs with `gemm` (always the grouped path: the loop is the
        high-precision reference); None goes back to high precision. Set once, before training,
        by the code that converts the model (moetrain.fp8.apply_fp8)."""
        self.gemm = gemm

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                first_expert: int = 0) -> torch.Tensor:
        """Rows grouped by expert -> outputs [N, D]. The rows belong to local experts
        first_expert .. first_expert + len(tokens_per_expert_E) - 1 (one piece of an overlapped
        exchange); by default to all of them."""
        device_type = x_ND.device.type
        if torch.is_autocast_enabled(device_type):  # autocast does not reach grouped_mm
            x_ND = x_ND.to(torch.get_autocast_dtype(device_type))
        w1, w3, w2 = (_local(w).to(x_ND.dtype) for w in (self.w1, self.w3, self.w2))
        n = tokens_per_expert_E.shape[0]
        if first_expert or n != w1.shape[0]:
            w1, w3, w2 = (w[first_expert:first_expert + n] for w in (w1, w3, w2))
        if self.gemm is not None and x_ND.shape[0] > 0:
            kernel = kernels.choose(self.kernels, "swiglu", x_ND)
            fn = experts_grouped if x_ND.dtype == torch.bfloat16 else _experts_grouped_eager
            return fn(x_ND, tokens_per_expert_E, w1, w3, w2, kernel, self.gemm)
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_usable(x_ND, w1, w3, w2)
        if grouped and x_ND.shape[0] > 0:
            kernel = kernels.choose(self.kernels, "swiglu", x_ND)
            opaque = torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16
            return experts_grouped(x_ND, tokens_per_expert_E, w1, w3, w2, kernel,
                                   _grouped_mm_op if opaque else None)
        return experts_loop(x_ND, tokens_per_expert_E, w1, w3, w2)
