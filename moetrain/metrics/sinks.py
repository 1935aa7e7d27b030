"""Where metrics go: metrics.jsonl / routing.jsonl, the console progress line, wandb, TensorBoard.

Only rank 0 builds a `MetricsLogger`; every sink is optional except the JSONL files, which are
the contract later tools (plots, tests) read.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from moetrain.config.schema import LoggingConfig


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps > `step` (left by a run that crashed after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed run
    path.write_text("".join(k + "\n" for k in kept))


def _finite(value: Any, path: str, bad: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(path)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(value)]
    return value


def strict_json(record: dict[str, Any]) -> str:
    """`record` as strict JSON (RFC 8259 has no NaN or Infinity): a non-finite number becomes
    null and the record gets `nonfinite`, the keys (dotted paths) that were NaN or inf."""
    bad: list[str] = []
    clean = _finite(record, "", bad)
    if bad:
        clean["nonfinite"] = bad
    return json.dumps(clean, allow_nan=False)


class JsonlWriter:
    def __init__(self, path: Path, resume_step: int | None) -> None:
        if resume_step is None:
            path.unlink(missing_ok=True)
        else:
            _truncate_after(path, resume_step)
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(strict_json(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """One status line: rewritten in place on a terminal, a printed line per log step otherwise."""

    def __init__(self, max_steps: int, stream: TextIO | None = None) -> None:
        self.max_steps = max_steps
        self.stream = stream or sys.stdout  # at construction: a replaced sys.stdout counts
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.start_step: int | None = None

    def update(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if self.start_step is None:
            self.start_step, self.start = step - 1, time.monotonic()
        done = step - self.start_step
        rate = done / max(time.monotonic() - self.start, 1e-9)
        eta = (self.max_steps - step) / rate if rate > 0 else float("inf")
        text = (
            f"step {step}/{self.max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"gnorm {rec['grad_norm']:.3f} | load_cv {rec['load_cv']:.3f} | "
            f"{rec['tokens_per_s']:,.0f} tok/s | ETA {_fmt_duration(eta)}"
        )
        if "mfu" in rec:
            text += f" | MFU {100 * rec['mfu']:.2f}% ({rec['model_tflops']:.3g} TFLOP/s/device)"
        if "val_loss" in rec:
            text += f" | val {rec['val_loss']:.4f}"
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class MetricsLogger:
    def __init__(
        self, run_dir: Path, cfg: LoggingConfig, max_steps: int, resume_step: int | None,
        config_dict: dict[str, Any],
    ) -> None:
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl", resume_step)
        self.routing = JsonlWriter(run_dir / "routing.jsonl", resume_step)
        self.progress = ProgressLine(max_steps) if cfg.progress else None
        self.wandb = None
        if cfg.wandb.enabled:
            import wandb  # checked importable by the trainer before training starts

            self.wandb = wandb.init(
                project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                dir=str(run_dir), config=config_dict, resume="allow",
            )
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any], routing: dict[str, Any] | None = None) -> None:
        self.metrics.write(record)
        if routing is not None:
            self.routing.write(routing)
        if self.progress is not None:
            self.progress.update(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])

    def event(self, name: str, step: int, **fields: Any) -> None:
        """A record of something that happened to the run (not a step's numbers): it has
        `event` instead of the step keys (docs/design.md); the caller logs it too."""
        record = {"step": step, "event": name, **fields}
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log({"event": name}, step=step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
        self.routing.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
