"""Shared pieces of the benchmarks in scripts/: device and dtype choice, timing, matmul ceiling.

Timing follows the usual rules for asynchronous devices: warm up first (allocator, kernel
selection and compilation stay out of the numbers), time every iteration with CUDA events (CPU:
a host clock, the work is synchronous) and report the median. Inputs are random, never zeros.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_iterations(fn: Callable[[], object], device: torch.device, iters: int,
                    warmup: int, before: Optional[Callable[[], None]] = None) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn` after `warmup` untimed ones.

    `before` runs ahead of every call outside the timed region (e.g. dropping gradients)."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            if before is not None:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                   iters: int = 20, warmup: int = 5, rounds: int = 3) -> float:
    """Measured TFLOP/s of one large square matmul (2 n^3 FLOPs) in `dtype`: the dense ceiling
    that MoE throughput is compared with. n defaults to 8192 on CUDA, 512 on CPU. The best of
    `rounds` medians: a round slowed by something else on the machine does not lower it."""
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = min(median(time_iterations(lambda: torch.matmul(a, b, out=out), device, iters, warmup))
             for _ in range(rounds))
    return 2.0 * n**3 / (ms * 1e-3) / 1e12
