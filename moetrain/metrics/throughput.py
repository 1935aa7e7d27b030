"""Model TFLOP/s per device and MFU of the training steps.

FLOPs per token are the planner's (`moetrain.planning.flops_per_token`: 6 x the active
matmul parameters plus attention, the PaLM / Megatron convention; full, not causal, attention)
at the step's top-k, so MFU is what `python -m moetrain.plan` and `scripts/bench_train.py`
report for the same config. Model TFLOP/s per device = FLOPs per token x tokens/s / world size.

The peak it is divided by is named in every record (`peak_name`): the device's dense peak from
`PEAK_TFLOPS` (vendor datasheets, no sparsity) for the run's compute dtype, or, for a CPU or a
device not in the table, the ceiling of one square matmul measured in this process at the start
(`moetrain.metrics.timing.matmul_ceiling`: a measured ceiling, so MFU on a CPU says how close the
model's matmuls come to the best this process can do, not to a datasheet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from moetrain.metrics.timing import device_name, matmul_ceiling

from moetrain.planning import flops_per_token

log = logging.getLogger(__name__)

#: Dense peak TFLOP/s per device: (substring of torch.cuda.get_device_name, lower case) ->
#: {compute dtype: TFLOP/s}. First match wins (more specific names first). fp32 is true FP32
#: (PyTorch's default matmul precision), not TF32.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bf16": 756.0, "fp32": 51.0}),
    ("h100 nvl", {"bf16": 835.0, "fp32": 60.0}),
    ("h100", {"bf16": 989.4, "fp32": 66.9}),  # SXM5
    ("h200", {"bf16": 989.4, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.1, "fp32": 91.6}),
    ("mi300x", {"bf16": 1307.4, "fp32": 163.4}),
    ("b200", {"bf16": 2250.0}),
]


@dataclass(frozen=True)
class Peak:
    tflops: float
    name: str


def table_peak(device_name: str, dtype: str) -> Peak | None:
    """The datasheet peak of a device for `dtype` ('bf16' | 'fp32'), None when not listed."""
    lower = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key in lower:
            return Peak(peaks[dtype], f"{device_name} {dtype} dense peak (datasheet)") \
                if dtype in peaks else None
    return None


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak MFU is measured against on this rank's device (module docstring)."""
    name = device_name(device)
    short = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        peak = table_peak(name, short)
        if peak is not None:
            return peak
    n = 4096 if device.type == "cuda" else 512
    # A few calls: on a CPU this costs ~0.1 s at the start of a run.
    tflops = matmul_ceiling(device, dtype, n=n, iters=5, warmup=1, rounds=2)
    return Peak(tflops, f"{name} {short} matmul ceiling ({n}x{n}, measured at start)")


class Throughput:
    """`model_tflops` (per device), `mfu`, `peak_tflops` and `peak_name` of a step."""

    def __init__(self, model_cfg: Any, seq_len: int, world_size: int, peak: Peak) -> None:
        self.model_cfg, self.seq_len, self.world_size, self.peak = model_cfg, seq_len, world_size, peak
        self._flops: dict[int, float] = {}

    def flops_per_token(self, top_k: int) -> float:
        if top_k not in self._flops:  # pure arithmetic over the config, once per top-k
            self._flops[top_k] = flops_per_token(self.model_cfg, self.seq_len, top_k).train
        return self._flops[top_k]

    def record(self, tokens_per_s: float, top_k: int) -> dict[str, Any]:
        tflops = self.flops_per_token(top_k) * tokens_per_s / self.world_size / 1e12
        return {"model_tflops": tflops, "mfu": tflops / self.peak.tflops,
                "peak_tflops": self.peak.tflops, "peak_name": self.peak.name}


__all__ = ["PEAK_TFLOPS", "Peak", "Throughput", "device_peak", "table_peak"]
