"""Non-finite steps: counting them, refusing to checkpoint them, and the rollback option.

A step whose loss or gradient norm is NaN/inf is skipped (no optimizer update). Weights can be
poisoned all the same (a finite gradient through a damaged optimizer state writes NaN weights,
and every later step is then non-finite), so no checkpoint is written while the last step was
not finite: `latest` keeps naming the last good one and `checkpoint.keep_last` prunes nothing.
The count of bad steps in a row is part of the checkpointed state, so a resumed run does not get
a fresh allowance.

After `train.max_bad_steps` in a row, `train.on_bad_steps` says what happens:
- `stop` (default): the run stops with one line and exit code 2;
- `rollback`: every rank reloads the newest checkpoint that verifies (weights, optimizer, RNG
  and step) but keeps the data position, so the batches of the streak are skipped - the
  recovery from loss spikes that PaLM describes (Chowdhery et al. 2022, sec. 5.1: restart from
  a checkpoint ~100 steps before the spike and skip 200-500 batches). A second rollback to the
  same checkpoint means training made no progress in between: the run stops instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moetrain.checkpoint import CheckpointManager, TrainState

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def count_bad_step(state: TrainState, skipped: bool, max_bad_steps: int, on_bad_steps: str) -> bool:
    """Account the step just taken (`state.step` already advanced); True when the streak calls
    for a rollback. Raises TrainingError when it calls for a stop."""
    if not skipped:
        state.bad_in_row = 0
        return False
    state.bad_in_row += 1
    state.bad_steps_total += 1
    if state.bad_in_row < max_bad_steps:
        return False
    if on_bad_steps == "rollback":
        return True
    raise TrainingError(
        f"loss or gradient was NaN/inf for {state.bad_in_row} steps in a row "
        f"(train.max_bad_steps={max_bad_steps}); stopping at step {state.step}; no checkpoint was "
        "written during the streak, so checkpoints/latest is the last good one "
        "(train.on_bad_steps=rollback goes back to it and skips the streak's batches)")


def rollback(ckpt: CheckpointManager, model, optimizer, state: TrainState,
             previous: Path | None) -> tuple[TrainState, Path]:
    """Reload the newest checkpoint that verifies into `model` and `optimizer`; returns its train
    state with this run's data position and bad-step total, and its path. Every rank calls it
    (the skip flag is global). Raises TrainingError when there is none, or when it is
    `previous` (the checkpoint of the last rollback: no progress since)."""
    streak, at = state.bad_in_row, state.step
    ckpt.wait()  # a background save in flight is a good checkpoint too
    path, rejected = ckpt.choose("auto")
    for r in rejected:
        log.warning("rollback: passing over %s: %s", r.path, r.reason)
    if path is None:
        raise TrainingError(f"{streak} non-finite steps in a row at step {at} and no checkpoint to "
                            "roll back to (checkpoint.every=0, or none written yet)")
    if path == previous:
        raise TrainingError(f"{streak} non-finite steps in a row at step {at}, again after rolling "
                            f"back to {path}: no progress since; stopping")
    restored = ckpt.load(path, model, optimizer)
    skipped_batches = at - restored.step
    restored.sampler = state.sampler  # keep going forward through the data: skip the streak's
    restored.bad_steps_total = state.bad_steps_total
    restored.bad_in_row = 0
    log.warning("rollback: %d non-finite steps in a row at step %d; reloaded %s (step %d) and "
                "skipped the %d global batches since it", streak, at, path, restored.step,
                skipped_batches)
    return restored, path
