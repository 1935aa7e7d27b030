"""Process-level setup: distributed init, device and precision, seeding, determinism, run dir."""

from __future__ import annotations

import datetime as _dt
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moetrain.config.schema import MoetrainConfig, TrainConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: run in fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def planned_device(cfg: TrainConfig, local_rank: int | None = None) -> torch.device:
    """The device train.device picks for this process (LOCAL_RANK's GPU), without using it:
    for checks that must run before the process group and the data (train.fp8's recipe)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            from moetrain.config.validate import ConfigError

            raise ConfigError("train.device='cuda' is invalid: no CUDA device is visible (use auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    device = planned_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return device


def init_runtime(cfg: MoetrainConfig) -> Runtime:
    """Start the process group (when launched by torchrun), choose device, precision and seeds."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg.train, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # the generous phase; moetrain.watchdog tightens it after the first step
        dist.init_process_group(backend=backend,
                                timeout=_dt.timedelta(seconds=cfg.fault.init_timeout))
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        make_deterministic()
    return Runtime(rank, world_size, local_rank, device, autocast_dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def resolve_run_dir(cfg: MoetrainConfig, rt: Runtime) -> Path:
    """The one run directory every rank uses: `run.dir`, else chosen on rank 0 and broadcast.

    Creates nothing (`create_run_dir` does, once everything else was checked); raises
    ConfigError naming run.dir when the directory could not be created or written.
    """
    if cfg.run.dir:
        path = Path(cfg.run.dir)
    else:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if run_id and run_id != "none":
            name = f"{cfg.run.name}-{run_id}"
        else:
            name = f"{cfg.run.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path = Path("outputs") / _from_rank0(name, rt)
    path = path.resolve()
    _raise_run_dir_error(_from_rank0(_unwritable(path) if rt.is_main else None, rt), path)
    return path


def create_run_dir(path: Path, rt: Runtime, files: dict[str, str]) -> None:
    """Create the run directory and its logs/ on rank 0 and write `files` (name -> text) into it;
    every rank returns once that is done. Raises ConfigError naming run.dir on failure."""
    error = None
    if rt.is_main:
        target = path / "logs"
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                target, tmp = path / name, path / f".{name}.tmp"
                try:
                    tmp.write_text(text)
                    os.replace(tmp, target)  # a reader never sees half a file
                finally:
                    tmp.unlink(missing_ok=True)
        except OSError as err:
            error = f"cannot write {target}: {err.strerror or err}"
    _raise_run_dir_error(_from_rank0(error, rt), path)


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be created or written (without creating anything), or None."""
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    # access() also reports read-only file systems and immutable directories for root.
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _raise_run_dir_error(error: str | None, path: Path) -> None:
    if error:
        from moetrain.config.validate import ConfigError

        raise ConfigError(f"run.dir={str(path)!r} is unusable: {error}")


def _from_rank0(value, rt: Runtime):
    """Rank 0's `value` on every rank (also a barrier)."""
    if rt.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
