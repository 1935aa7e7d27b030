"""Kernels for the MoE layer's memory-bound steps: a Triton kernel and a PyTorch path each.

    build_row_map(slot_N, T, k, rows_N=None, num_rows=None) -> RowMap
    permute(x_TD, row_map, kernels)              gather token rows into expert-grouped order
    unpermute(rows_MD, weight_TK, row_map, kernels)  weighted combine of each token's k rows
    swiglu(a_NF, b_NF, kernels)                  silu(a) * b between the expert GEMMs

`kernels` is the `model.moe.kernels` setting: auto | torch | triton (select.py). Triton is
imported only when a Triton path runs (moetrain.kernels.triton_ops). docs/performance.md
describes the kernels, the memory traffic they save and how they are tested.
"""

from moetrain.kernels.ops import permute, swiglu, unpermute
from moetrain.kernels.rowmap import RowMap, build_row_map
from moetrain.kernels.select import (
    KERNEL_SETTINGS, OPS, check_setting, choose, interpreter_enabled, recorded_speedup,
    triton_importable, triton_usable,
)

__all__ = [
    "KERNEL_SETTINGS", "OPS", "RowMap", "build_row_map", "check_setting", "choose",
    "interpreter_enabled", "permute", "recorded_speedup", "swiglu", "triton_importable",
    "triton_usable", "unpermute",
]
