"""Entry point: `torchrun --nproc_per_node N -m moetrain.train +experiment=NAME key=value ...`."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moetrain.checkpoint import CheckpointError
from moetrain.config import CONFIG_DIR, ConfigError, compose, register_configs, to_object, validate
from moetrain.data import DataError, ensure_prepared
from moetrain.data.report import config_comment, log_data
from moetrain.fp8 import resolve_fp8
from moetrain.parallel import LayoutError, check_layout
from moetrain.rank_exit import exit_with_launcher, report_error, unblock_interrupt
from moetrain.runlock import check_free, lock_run_dir
from moetrain.runtime import (
    Runtime, create_run_dir, init_runtime, planned_device, resolve_run_dir, shutdown,
)

log = logging.getLogger("moetrain")

# Failures a user can fix: reported as one line, exit code 2, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, LayoutError)


def _setup_logging(is_main: bool) -> logging.handlers.MemoryHandler:
    """Console on rank 0 now; the file log is buffered until the run directory exists."""
    buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    handlers: list[logging.Handler] = [buffer]
    if is_main:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        console.setLevel(logging.INFO)  # per-rank details (DEBUG) go to the rank's file only
        handlers.append(console)
    root = logging.getLogger("moetrain")
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG)  # the console handler keeps INFO; the rank's file gets all
    root.propagate = False
    return buffer


def _start_log_file(run_dir: Path, rt: Runtime, buffer: logging.handlers.MemoryHandler) -> None:
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rt.rank}.log")
    file_handler.setFormatter(
        logging.Formatter(f"%(asctime)s [rank{rt.rank}] %(levelname)s %(name)s: %(message)s"))
    buffer.setTarget(file_handler)
    buffer.flush()  # what was logged while the run directory did not exist yet
    root = logging.getLogger("moetrain")
    root.handlers[root.handlers.index(buffer)] = file_handler


def _log_crash_to_file() -> None:
    """The exception being handled, with its traceback, into this rank's log file only (the
    console gets Python's own traceback when it is re-raised: not twice). Nothing before the
    run directory exists (the buffered records have no file yet)."""
    root = logging.getLogger("moetrain")
    record = root.makeRecord(root.name, logging.ERROR, __file__, 0,
                             "stopped on an unexpected error:", (), sys.exc_info())
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _scheduler_note() -> str:
    """The SLURM job and how often it has been requeued, for the per-rank logs."""
    job = os.environ.get("SLURM_JOB_ID")
    note = f", SLURM job {job}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt not in ("", "0"):  # moetrain.torchrun restarted the worker group (elastic.py)
        note += f", worker group restart {attempt}"
    return note


def run(cfg: DictConfig) -> int:
    """Validate, set up and train; returns the process exit code.

    Nothing is written into the run directory before the config, the data and the checkpoint to
    resume from have been checked: building the `Trainer` only reads, so a refused start leaves
    an existing run untouched and creates no new one. A directory another run holds is refused
    first (moetrain/runlock.py); the lock is the first thing written into it.
    """
    from moetrain.trainer import Trainer, TrainingError

    lock = None
    try:
        # moetrain.torchrun's ranks inherit SIGINT blocked: a Ctrl-C relayed while this rank
        # started is taken here (KeyboardInterrupt below), later ones as in any process.
        unblock_interrupt()
        typed = to_object(cfg)
        validate(typed)
        check_layout(typed, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        resolve_fp8(typed.train, planned_device(typed.train))  # a recipe this device cannot run
        if typed.run.dir:  # a live run there: refused before anything is prepared or built
            check_free(Path(typed.run.dir).resolve())
        if typed.model.init.from_hf or typed.model.init.upcycle_from:
            from moetrain.hf.load import check_init, use_hf_tokenizer  # only when needed

            check_init(typed)
            use_hf_tokenizer(typed)  # an imported model keeps its vocabulary
        # Before the process group exists: rank 0 by torchrun's environment. The preparation's
        # progress shows on the console and lands in the rank's log file later.
        log_buffer = _setup_logging(int(os.environ.get("RANK", "0")) == 0)
        # Bad data is refused, and the data prepared, before any process group or run directory.
        prepared = ensure_prepared(typed.data, typed.model.vocab_size)
        rt = init_runtime(typed)
        run_dir = resolve_run_dir(typed, rt)
        trainer = Trainer(typed, rt, run_dir)
        lock = lock_run_dir(run_dir, rt.rank, rt.world_size)  # before anything is written there
        create_run_dir(run_dir, rt, {"config.yaml": OmegaConf.to_yaml(OmegaConf.structured(typed))
                                     + config_comment(prepared, typed.data)})
        _start_log_file(run_dir, rt, log_buffer)
        log.info("rank %d of %d on %s (pid %d, device %s)%s", rt.rank, rt.world_size,
                 socket.gethostname(), os.getpid(), rt.device, _scheduler_note())
        log_data(prepared, typed.data)  # which directory and sources this run reads
        if rt.is_main:
            log.info("run directory: %s", run_dir)
            _log_checkpoint_policy(typed.checkpoint.every, run_dir)
        trainer.fit()
        log.info("rank %d exits at step %d", rt.rank, trainer.state.step)
        return 0
    except USER_ERRORS + (TrainingError,) as err:
        report_error(f"error: {err}")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        report_error("\nerror: interrupted (Ctrl-C); stopped without saving a checkpoint")
        return 130  # 128 + SIGINT, what a shell reports for a run killed by Ctrl-C
    except Exception:
        # The traceback goes to stderr (re-raised), which is lost with a dead launcher: the
        # rank's own log keeps why it stopped.
        _log_crash_to_file()
        raise
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def _log_checkpoint_policy(every: int, run_dir: Path) -> None:
    where = run_dir / "checkpoints"
    if every > 0:
        log.info("checkpoints: every %d steps and at the last step, into %s", every, where)
    else:
        log.warning("checkpoint.every=0: a checkpoint is written only when a signal or "
                    "train.max_time stops the run early, into %s", where)


register_configs()


def _alias_async_key(argv: list[str]) -> list[str]:
    """Accept `checkpoint.async=...` for the schema's `checkpoint.async_save` (a keyword can't be a field)."""
    return [re.sub(r"^(\+?)checkpoint\.async=", r"\1checkpoint.async_save=", a) for a in argv]


def check_command_line(overrides: list[str]) -> int:
    """Compose the overrides as `@hydra.main` is about to and report a bad one like any other
    user error (one line naming the key, exit 2); Hydra would print several lines and exit 1.
    Returns the exit code: 0 when the config composes. One extra composition costs ~0.1 s."""
    if any(arg.startswith("-") for arg in overrides):
        return 0  # Hydra's own flags (--help, --cfg job, -m, ...): Hydra's rules apply
    try:
        to_object(compose(overrides))
    except ConfigError as err:
        report_error(f"error: {err}")
        return 2
    return 0


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    exit_with_launcher()  # under torchrun: end with the launcher, however it ends
    sys.argv = _alias_async_key(sys.argv)
    if code := check_command_line(sys.argv[1:]):
        sys.exit(code)
    main()
