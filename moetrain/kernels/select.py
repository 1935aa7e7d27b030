"""Which implementation of a kernel runs: `model.moe.kernels: auto | torch | triton`.

    torch   the PyTorch path (moetrain.kernels.reference), everywhere
    triton  the Triton kernel; an error where it cannot run
    auto    Triton only on a CUDA tensor, with triton importable, and only where the recorded
            benchmark (speed_record.json beside this file, written from
            `scripts/bench_kernels.py` runs) shows it faster than the PyTorch path on this GPU
            model and dtype at every recorded shape; no record -> torch

Triton can run a kernel on a CUDA tensor (compiled) or, with TRITON_INTERPRET=1 in the
environment when the kernel is first used, on a CPU tensor through Triton's interpreter (slow;
for tests). `auto` never picks the interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import torch

KERNEL_SETTINGS = ("auto", "torch", "triton")
OPS = ("permute", "unpermute", "swiglu")
SPEED_RECORD = Path(__file__).with_name("speed_record.json")
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET as Triton reads it (1/true/yes/on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on this tensor here: triton importable, and the tensor
    on CUDA, or on the CPU with the interpreter enabled. Only fp32 and bf16 are supported."""
    if not triton_importable() or t.dtype not in _DTYPE_NAMES:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_model(device: torch.device) -> str:
    """The GPU model as recorded (torch.cuda.get_device_name), e.g. 'NVIDIA H200'."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def load_speed_record(path: Path = SPEED_RECORD) -> list[dict]:
    """The recorded benchmark entries ({op, device, dtype, shape, torch_ms, triton_ms, ...})."""
    with open(path) as fh:
        record = json.load(fh)
    entries = record.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'entries' must be a list")
    return entries


@functools.lru_cache(maxsize=None)
def _recorded_entries() -> tuple[dict, ...]:
    return tuple(load_speed_record())


def recorded_speedup(op: str, device: str, dtype: str,
                     entries: Optional[list[dict]] = None) -> Optional[float]:
    """Smallest torch_ms / triton_ms over the recorded shapes of (op, device, dtype); None when
    nothing is recorded for them. > 1: Triton was faster at every recorded shape."""
    if entries is None:
        entries = list(_recorded_entries())
    ratios = [e["torch_ms"] / e["triton_ms"] for e in entries
              if e.get("op") == op and e.get("device") == device and e.get("dtype") == dtype
              and e.get("triton_ms") and e.get("torch_ms")]
    return min(ratios) if ratios else None


def check_setting(setting: str) -> str:
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"model.moe.kernels={setting!r}: must be one of {', '.join(KERNEL_SETTINGS)}")
    return setting


def choose(setting: str, op: str, t: torch.Tensor) -> str:
    """'torch' or 'triton' for running `op` on tensor `t` under `setting` (module docstring).

    Raises ValueError for an unknown setting or op, and for setting 'triton' where Triton cannot
    run (the message says why and what would).
    """
    check_setting(setting)
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    if setting == "torch":
        return "torch"
    if setting == "triton":
        if not triton_usable(t):
            raise ValueError(
                f"model.moe.kernels=triton: the Triton {op} kernel cannot run on a {t.device.type} "
                f"{dtype_name(t.dtype)} tensor here (triton importable: {triton_importable()}; "
                f"needs CUDA, or the CPU with TRITON_INTERPRET=1; fp32 or bf16); "
                f"use model.moe.kernels=auto or torch")
        return "triton"
    if not t.is_cuda or interpreter_enabled() or not triton_usable(t):
        return "torch"
    return auto_choice(op, device_model(t.device), dtype_name(t.dtype))


def auto_choice(op: str, device: str, dtype: str, entries: Optional[list[dict]] = None) -> str:
    """`auto` on a CUDA tensor: 'triton' if the record shows the kernel faster than the PyTorch
    path at every recorded shape for this GPU model and dtype, else 'torch'."""
    if entries is None:
        return _recorded_choice(op, device, dtype)
    speedup = recorded_speedup(op, device, dtype, entries)
    return "triton" if speedup is not None and speedup > 1.0 else "torch"


@functools.lru_cache(maxsize=None)
def _recorded_choice(op: str, device: str, dtype: str) -> str:
    # once per (op, GPU, dtype) and process: the shipped record does not change during a run
    return auto_choice(op, device, dtype, list(_recorded_entries()))
