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


def _pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            from moetrain.config.validate import ConfigError

            raise ConfigError("train.device='cuda' is invalid: no CUDA device is visible (use auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(cfg: MoetrainConfig) -> Runtime:
    """Start the process group (when launched by torchrun), choose device, precision and seeds."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(cfg.train, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=10))
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
    """The one run directory every rank uses: `run.dir`, else chosen on rank 0 and broadcast."""
    if cfg.run.dir:
        path = Path(cfg.run.dir)
    else:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if run_id and run_id != "none":
            name = f"{cfg.run.name}-{run_id}"
        else:
            name = f"{cfg.run.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        box = [name]
        if rt.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        path = Path("outputs") / box[0]
    path = path.resolve()
    if rt.is_main:
        path.mkdir(parents=True, exist_ok=True)
    if rt.world_size > 1:
        dist.barrier()
    return path


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
