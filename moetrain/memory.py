"""How much memory this rank uses: its peak (CUDA max-allocated on a GPU, peak resident set size
on CPU) and the bytes its parameters, gradients and optimizer states hold.

    reset_peak(device)       start a new measurement window (a step)
    peak_bytes(device)       the peak since the last reset (or since the process started)
    parameter_bytes(model)   bytes this rank's parameter storage holds (shards, with padding)
    gradient_bytes(model)    the same for their gradients
    optimizer_bytes(opt)     the same for the optimizer's states

On CPU the peak is the kernel's high-water mark of the resident set (VmHWM), reset by writing 5
to /proc/self/clear_refs (Linux >= 4.0); where that is not possible the peak is the process's
lifetime peak (getrusage). It counts everything resident: the interpreter, torch's libraries,
pages shared with a parent process; docs/initialisation.md compares it with the planner.
"""

from __future__ import annotations

import logging
import re
import resource
import sys
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

GIB = 2**30

# Per-rank lines go to each rank's log file only (train.py's console shows INFO and above).
rank_log = logging.getLogger("moetrain.memory")
rank_log.setLevel(logging.DEBUG)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak(device: torch.device) -> None:
    """Start a new window for `peak_bytes` (no device synchronisation)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident set's high-water mark to the current size
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak`: CUDA max-allocated bytes on a GPU, the peak
    resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def current_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes, or the resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    kib = _proc_status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def _holders(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding `t`'s memory: a DTensor's local shard, a wrapper subclass's
    inner tensors (torchao's float8 weights under FSDP2's float8 all-gather), else `t`."""
    if isinstance(t, DTensor):
        t = t.to_local()
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _holders(getattr(t, name))
    else:
        yield t


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    seen: dict[int, int] = {}
    for t in tensors:
        for local in _holders(t):
            if local.is_meta:
                continue
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameter storage (FSDP2's padded shards included)."""
    return _storage_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    return _storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step; Muon:
    momentum_buffer)."""
    return _storage_bytes(v for state in optimizer.state.values() for v in state.values()
                          if isinstance(v, torch.Tensor))


__all__ = ["GIB", "current_bytes", "gradient_bytes", "optimizer_bytes", "parameter_bytes",
           "peak_bytes", "rank_log", "reset_peak"]
