"""Entry point: `torchrun --nproc_per_node N -m moetrain.train +experiment=NAME key=value ...`."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moetrain.checkpoint import CheckpointError
from moetrain.config import CONFIG_DIR, ConfigError, register_configs, to_object, validate
from moetrain.data import DataError
from moetrain.runtime import Runtime, init_runtime, resolve_run_dir, shutdown

log = logging.getLogger("moetrain")

# Failures a user can fix: reported as one line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError)


def _setup_logging(run_dir: Path, rt: Runtime) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rt.rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rt.rank}.log")
    file_handler.setFormatter(fmt)
    handlers: list[logging.Handler] = [file_handler]
    if rt.is_main:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(console)
    root = logging.getLogger("moetrain")
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
    root.propagate = False


def _scheduler_note() -> str:
    """The SLURM job and how often it has been requeued, for the per-rank logs."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    return f", SLURM job {job}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}"


def run(cfg: DictConfig) -> int:
    """Validate, set up and train; returns the process exit code."""
    from moetrain.trainer import Trainer, TrainingError

    try:
        typed = to_object(cfg)
        validate(typed, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        rt = init_runtime(typed)
        run_dir = resolve_run_dir(typed, rt)
        if rt.is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(typed)))
        _setup_logging(run_dir, rt)
        log.info("rank %d of %d on %s (pid %d, device %s)%s", rt.rank, rt.world_size,
                 socket.gethostname(), os.getpid(), rt.device, _scheduler_note())
        if rt.is_main:
            log.info("run directory: %s", run_dir)
        trainer = Trainer(typed, rt, run_dir)
        trainer.fit()
        log.info("rank %d exits at step %d", rt.rank, trainer.state.step)
        return 0
    except USER_ERRORS + (TrainingError,) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()


register_configs()


def _alias_async_key(argv: list[str]) -> list[str]:
    """Accept `checkpoint.async=...` for the schema's `checkpoint.async_save` (a keyword can't be a field)."""
    return [re.sub(r"^(\+?)checkpoint\.async=", r"\1checkpoint.async_save=", a) for a in argv]


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv = _alias_async_key(sys.argv)
    main()
