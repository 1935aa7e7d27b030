"""The test harness every test that needs a run uses: the tiny experiment at test sizes, config
-> Trainer, the command line, and forked gloo ranks (tests/distributed/launcher.py).

    cfg = tiny_config(["parallel.tp=2"], world_size=2)        # composed, validated, layout-checked
    trainer = build_trainer(tmp_path, ["train.max_steps=2"])  # in this process (or in a rank)
    proc = run_train(["train.max_steps=2", f"run.dir={d}"])   # python -m moetrain.train ...
    results = run_distributed(fn, 4, *args)                   # fn(rank, world_size, *args)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moetrain.config import compose, to_object, validate
from moetrain.config.schema import ModelConfig, MoetrainConfig
from moetrain.parallel import check_layout
from tests.distributed.launcher import run_distributed

ROOT = Path(__file__).resolve().parents[1]

#: The tiny experiment as the tests run it: fp32 on the CPU, deterministic, 3 steps of a global
#: batch of 8 (4 micro-batches of 2), no evaluation, no checkpoints, no progress line.
TINY = (
    "+experiment=tiny",
    "train.max_steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.deterministic=true",
    "train.dtype=fp32",
    "train.device=cpu",
    "checkpoint.every=0",
    "checkpoint.resume=never",
    "logging.progress=false",
)


def tiny_config(overrides: Sequence[str] = (), world_size: int = 1,
                base: Sequence[str] = TINY) -> MoetrainConfig:
    """The typed config of `base` + `overrides`, composed like the command line does, value- and
    layout-checked for `world_size`. An `+experiment=NAME` among the overrides replaces the
    tiny experiment."""
    if any(o.startswith("+experiment=") for o in overrides):
        base = [o for o in base if not o.startswith("+experiment=")]
    cfg = to_object(compose([*base, *overrides]))
    validate(cfg)
    check_layout(cfg, world_size)
    return cfg


def tiny_model_config(*overrides: str) -> ModelConfig:
    """The tiny experiment's `model` section."""
    return tiny_config(overrides).model


def build_trainer(run_dir: Path, overrides: Sequence[str] = (), world_size: int = 1,
                  base: Sequence[str] = TINY):
    """A Trainer of `base` + `overrides` writing into `run_dir` (created); in a forked rank the
    process group is already up (`run_distributed`)."""
    from moetrain.runtime import init_runtime
    from moetrain.trainer import Trainer

    cfg = tiny_config(overrides, world_size, base)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, init_runtime(cfg), run_dir)


def run_train(overrides: Sequence[str], *, launcher: Sequence[str] = (), base: Sequence[str] = TINY,
              timeout: float = 600, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python [launcher] -m moetrain.train base overrides` in a child process; its output is
    captured as text. `launcher`: e.g. ("-m", "moetrain.torchrun", "--nproc_per_node", "2")."""
    cmd = [sys.executable, *launcher, "-m", "moetrain.train", *base, *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


__all__ = ["ROOT", "TINY", "build_trainer", "run_distributed", "run_train", "tiny_config",
           "tiny_model_config"]
