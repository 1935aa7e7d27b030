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
"""

from __future__ import annotations

from typing import Optional

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


@torch.compiler.disable  # probes with real tensors, not with a compile's fake ones
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
        _probe_results[key] = _probe(x_ND.device, x_ND.dtype)
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


def experts_grouped(x_ND, tokens_per_expert_E, w1_EDF, w3_EDF, w2_EFD,
                    kernel: str = "torch") -> torch.Tensor:
    """The grouped-GEMM path; `kernel` picks the SwiGLU between the GEMMs (moetrain.kernels)."""
    offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
    a_NF, b_NF = _gmm(x_ND, w1_EDF, offsets_E), _gmm(x_ND, w3_EDF, offsets_E)
    h_NF = F.silu(a_NF) * b_NF if kernel == "torch" else kernels.swiglu(a_NF, b_NF, kernel)
    return _gmm(h_NF, w2_EFD, offsets_E)


# torch.compile traces grouped_mm only in bf16 (its shape function refuses other dtypes, which
# the CPU kernel runs): other dtypes run it eagerly, a graph break around the expert GEMMs.
_experts_grouped_eager = torch.compiler.disable(experts_grouped)


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

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        device_type = x_ND.device.type
        if torch.is_autocast_enabled(device_type):  # autocast does not reach grouped_mm
            x_ND = x_ND.to(torch.get_autocast_dtype(device_type))
        w1, w3, w2 = (_local(w).to(x_ND.dtype) for w in (self.w1, self.w3, self.w2))
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_usable(x_ND, w1, w3, w2)
        if grouped and x_ND.shape[0] > 0:
            fn = experts_grouped if x_ND.dtype == torch.bfloat16 else _experts_grouped_eager
            kernel = kernels.choose(self.kernels, "swiglu", x_ND)
            return fn(x_ND, tokens_per_expert_E, w1, w3, w2, kernel)
        return experts_loop(x_ND, tokens_per_expert_E, w1, w3, w2)
