"""Runs of the tiny experiment at test sizes: the config, the Trainer in this process, and the
command line in a child process (python -m moetrain.train, under torchrun or not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moetrain.config import compose, to_object, validate
from moetrain.config.schema import ModelConfig, MoetrainConfig
from moetrain.parallel import check_layout
from moetrain.runtime import init_runtime
from moetrain.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]

#: The tiny experiment as the tests run it: fp32 on the CPU, deterministic, 3 steps of a global
#: batch of 8 (4 micro-batches of 2), no evaluation, no checkpoints, no resume, no progress line.
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

#: Overrides after TINY: the tiny experiment at a smaller size, for tests whose subject does not
#: depend on the model (checkpoint and process faults, the watchdog): two layers (a dense one,
#: then MoE), 2 micro-batches of one 32-token sequence per step - ~3x cheaper per step than
#: TINY, and smaller checkpoints to write, hash and copy.
SMALL = ("model.n_layers=2", "model.d_model=64", "model.ffn_hidden=128",
         "model.moe.expert_hidden=64", "train.global_batch_size=2", "train.micro_batch_size=1",
         "data.seq_len=32")

#: The environment every child process gets on top of this one's: one intra-op thread (what
#: torchrun gives each rank; the CI machine has 2 cores) and unbuffered output, so a test that
#: reads a child's output while it runs sees each line when it is written.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
    """The `model` section of `tiny_config(overrides)`."""
    return tiny_config(overrides).model


def trainer_for(cfg: MoetrainConfig, run_dir: Path):
    """A Trainer of the typed config `cfg` writing into `run_dir` (created). In a forked rank
    (`run_distributed`) the process group is already up."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, init_runtime(cfg), run_dir)


def build_trainer(run_dir: Path, overrides: Sequence[str] = (), world_size: int = 1,
                  base: Sequence[str] = TINY):
    """`trainer_for(tiny_config(overrides, world_size, base), run_dir)`."""
    return trainer_for(tiny_config(overrides, world_size, base), run_dir)


def torchrun(nproc: int, relay: bool = False) -> tuple[str, ...]:
    """The `launcher` of `nproc` local ranks: torchrun (torch.distributed.run) --standalone, or,
    with `relay`, moetrain.torchrun (torchrun relaying stop signals, as the batch scripts run)."""
    module = "moetrain.torchrun" if relay else "torch.distributed.run"
    return ("-m", module, "--standalone", "--nproc_per_node", str(nproc))


def local_sh(nproc: int) -> tuple[str, ...]:
    """The `launcher` of `nproc` ranks through the project's launch/local.sh, as a user starts
    them (the script runs `python -m moetrain.torchrun ... -m moetrain.train`; `child_env` puts
    this interpreter's directory first on PATH, so that `python` is this one)."""
    return ("bash", str(ROOT / "launch" / "local.sh"), str(nproc))


def train_command(overrides: Sequence[str], launcher: Sequence[str] = (),
                  base: Sequence[str] = TINY) -> list[str]:
    """`python [launcher] -m moetrain.train base overrides` as an argv; with a launch script
    (`local_sh`), `bash SCRIPT N base overrides`."""
    if launcher[:1] == ("bash",):  # the script names the interpreter and the module itself
        return [*launcher, *base, *overrides]
    return [sys.executable, *launcher, "-m", "moetrain.train", *base, *overrides]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A child's environment: this one, then CHILD_ENV, this interpreter's directory first on
    PATH (the `python` a launch script runs), then `env`."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **CHILD_ENV, "PATH": path, **(env or {})}


def run_python(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None,
               cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    """`python args...` in a child process (`child_env(env)`), its
    output captured as text. `check`: a non-zero exit fails the test with the exit code, stdout
    and the end of stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=child_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, args))}\nstdout:\n"
                             f"{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_train(overrides: Sequence[str], *, launcher: Sequence[str] = (),
              base: Sequence[str] = TINY, timeout: float = 600, env: dict[str, str] | None = None,
              cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess:
    """`python [launcher] -m moetrain.train base overrides` run to its end (`run_python`)."""
    if launcher[:1] == ("bash",):
        raise ValueError("run_train runs python; start a launch script with start_train")
    return run_python(*train_command(overrides, launcher, base)[1:], timeout=timeout, env=env,
                      cwd=cwd, check=check)


def start_train(overrides: Sequence[str], *, launcher: Sequence[str] = (),
                base: Sequence[str] = TINY, env: dict[str, str] | None = None, cwd: Path = ROOT,
                **popen) -> subprocess.Popen:
    """The same command started in the background (for signals, kills, watching its files):
    stdout and stderr piped as text unless `popen` says otherwise (e.g. stderr=STDOUT)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(train_command(overrides, launcher, base), cwd=cwd,
                            env=child_env(env), **popen)
