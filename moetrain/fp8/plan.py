"""Which FP8 implementation a run uses: `train.fp8` and `train.fp8_backend` against the device.

    plan = resolve_fp8(cfg.train, device)     # None for train.fp8=none; ConfigError otherwise

On the CPU every torchao recipe runs emulated: operands quantized and dequantized exactly as the
recipe defines, the GEMM in high precision (how CI tests FP8). On an NVIDIA GPU the real kernels
run where the hardware has them and a recipe it lacks is refused in one line that says what
would run there (docs/fp8.md, "Recipes and hardware"):

    tensorwise, rowwise   compute capability >= 9.0 (Hopper): torch._scaled_grouped_mm for the
                          routed experts (the float8 linears alone would run from 8.9)
    mxfp8                 compute capability >= 10.0 (Blackwell) and torchao's SM100 kernels
    train.fp8_backend=te  the same, and Transformer Engine importable
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from moetrain.config.validate import ConfigError

#: Every group / dimension an FP8 GEMM quantizes along must be a multiple of this (the FP8
#: kernels' 16-byte alignment; MXFP8: its 32-element scaling block).
ALIGNMENT = {"tensorwise": 16, "rowwise": 16, "mxfp8": 32}
# (major, minor) compute capability each recipe needs on an NVIDIA GPU: the routed experts'
# scaled grouped GEMM (the float8 linears alone would run from 8.9 on).
CAPABILITY = {"tensorwise": (9, 0), "rowwise": (9, 0), "mxfp8": (10, 0)}


@dataclass(frozen=True)
class FP8Plan:
    """How a run computes in FP8 (docs/fp8.md).

    recipe: tensorwise | rowwise | mxfp8; backend: torchao | te (the dense linears; the routed
    experts always go through torchao's grouped GEMMs); emulate: quantize -> dequantize ->
    high-precision GEMM instead of the FP8 kernels (the CPU); output_head: the output head is a
    float8 linear too; fsdp_float8_all_gather: FSDP2 all-gathers the tensorwise linears' weights
    in float8 (set by `moetrain.parallel.parallelize` where FSDP shards them).
    """

    recipe: str
    backend: str = "torchao"
    emulate: bool = True
    output_head: bool = False
    fsdp_float8_all_gather: bool = False

    @property
    def alignment(self) -> int:
        return ALIGNMENT[self.recipe]

    def with_fsdp_all_gather(self, sharded: bool) -> "FP8Plan":
        """This plan for a model whose linears FSDP shards (`sharded`): torchao's float8
        all-gather applies to the tensorwise recipe only (row and block scales need the whole
        row or block, which a shard does not have)."""
        return replace(self, fsdp_float8_all_gather=sharded and self.recipe == "tensorwise")


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def resolve_fp8(train: Any, device: torch.device) -> Optional[FP8Plan]:
    """The FP8 plan of `train` (a TrainConfig) on `device`, or None for train.fp8=none.

    Raises ConfigError (one line naming the key and what would run) where the device cannot run
    the recipe or a package is missing."""
    recipe, backend = str(train.fp8), str(train.fp8_backend)
    if recipe == "none":
        return None
    if not torchao_available():
        raise ConfigError(f"train.fp8={recipe} is invalid here: torchao is not installed "
                          "(pip install 'moetrain[fp8]'), or set train.fp8=none")
    if device.type != "cuda":
        if backend == "te":
            raise ConfigError(f"train.fp8_backend=te is invalid on the {device.type}: Transformer "
                              "Engine runs on NVIDIA GPUs only; train.fp8_backend=torchao runs "
                              "every recipe here, emulated")
        if train.compile:
            raise ConfigError(f"train.compile=true is invalid with train.fp8={recipe} on the "
                              f"{device.type}: the FP8 emulation runs eagerly only; set "
                              "train.compile=false (or train.fp8=none)")
        return FP8Plan(recipe, backend, emulate=True, output_head=train.fp8_output_head)
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    runnable = [r for r in ALIGNMENT if capability >= CAPABILITY[r]
                and (r != "mxfp8" or _mxfp8_kernels())]
    if recipe not in runnable:
        need = ".".join(map(str, CAPABILITY[recipe]))
        why = (f"needs compute capability {need}" if capability < CAPABILITY[recipe]
               else "needs torchao's SM100 kernels (a CUDA build of torchao)")
        here = (f"{' and '.join(runnable)} would run here" if runnable
                else "no FP8 recipe runs here: set train.fp8=none")
        raise ConfigError(f"train.fp8={recipe} is invalid on {name} (compute capability "
                          f"{capability[0]}.{capability[1]}): it {why}; {here}")
    if backend == "te":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("train.fp8_backend=te is invalid here: transformer_engine is not "
                              "installed (pip install 'moetrain[gpu]'); train.fp8_backend=torchao "
                              f"runs train.fp8={recipe}")
    return FP8Plan(recipe, backend, emulate=False, output_head=train.fp8_output_head)


def _mxfp8_kernels() -> bool:
    """torchao's Blackwell kernels for the MXFP8 grouped GEMM are loaded (a CUDA build)."""
    try:
        from torchao.prototype.moe_training import mxfp8_grouped_mm
    except ImportError:
        return False
    return bool(getattr(mxfp8_grouped_mm, "_SM100_KERNELS_AVAILABLE", False))


__all__ = ["ALIGNMENT", "FP8Plan", "resolve_fp8", "torchao_available"]
