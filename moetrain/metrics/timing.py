"""Device timing: the name of a device, timing a call the way asynchronous devices need, and the
measured dense matmul ceiling (the peak MFU is measured against where no datasheet peak is known,
moetrain/metrics/throughput.py; the benchmarks in scripts/ use the same functions).

Timing follows the usual rules for asynchronous devices: warm up first (allocator, kernel
selection and compilation stay out of the numbers), time every iteration with CUDA events (CPU:
a host clock, the work is synchronous) and report the median. Inputs are random, never zeros.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


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


__all__ = ["device_name", "matmul_ceiling", "median", "synchronize", "time_iterations"]
