"""Shared pieces of the benchmarks in scripts/: device and dtype choice, the MoE shapes; timing
and the matmul ceiling come from moetrain/metrics/timing.py (the trainer's MFU uses them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moetrain.metrics.timing import (  # noqa: F401 - the benchmarks import them from here
    device_name, matmul_ceiling, median, synchronize, time_iterations,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer's size: model dim d, expert hidden width f, experts, experts per token, tokens."""

    name: str
    d: int
    f: int
    experts: int
    top_k: int
    tokens: int
    norm_topk_prob: bool = True
    issue_baseline_tflops: Optional[float] = None  # one H100, bf16 (the issue's numbers)

    @property
    def flops(self) -> float:
        return 18.0 * self.tokens * self.top_k * self.d * self.f


MOE_SHAPES = {
    "mixtral": MoEShape("mixtral", 4096, 14336, 8, 2, 8192, True, 531.0),
    "olmoe": MoEShape("olmoe", 2048, 1024, 64, 8, 8192, False, 248.0),
    "qwen3": MoEShape("qwen3", 2048, 768, 128, 8, 16384, True, 226.0),
}


def parse_moe_shape(text: str) -> MoEShape:
    try:
        d, f, e, k, t = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --shape {text!r} must be five integers d,f,E,k,tokens") from None
    if min(d, f, e, k, t) < 1 or k > e:
        raise SystemExit(f"error: --shape {text!r}: all positive and k <= E")
    return MoEShape(f"{d},{f},{e},{k},{t}", d, f, e, k, t)


def moe_shapes(names: Optional[str], custom: list[str]) -> list[MoEShape]:
    """The shapes of --shape (each d,f,E,k,tokens) then those named in --shapes (a comma list of
    MOE_SHAPES); all of MOE_SHAPES when neither is given. Exits with a message on a bad one."""
    shapes = [parse_moe_shape(s) for s in custom]
    if names or not shapes:
        for name in (names or ",".join(MOE_SHAPES)).split(","):
            if name not in MOE_SHAPES:
                raise SystemExit(f"error: unknown shape {name!r}; known: {', '.join(MOE_SHAPES)}")
            shapes.append(MOE_SHAPES[name])
    return shapes


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    return torch.device(name)


