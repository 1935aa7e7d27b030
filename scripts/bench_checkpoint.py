"""What checkpointing costs the training loop: no saves vs synchronous vs asynchronous saves.

    python scripts/bench_checkpoint.py [overrides...] [--steps N] [--save-every K] [--warmup W]
                                       [--repeats R] [--json OUT]

Trains the `tiny` experiment in this process (one rank; `overrides` are Hydra-style config
overrides on top of `+experiment=tiny`) three times from the same seed, in fresh run
directories: no checkpoints, a synchronous save every K steps, an asynchronous one every K
steps. The loop is the trainer's own; per step it reports the time of `train_step` and how
long the poll + save calls block the loop. Details and measurements: docs/checkpointing.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.config import compose, to_object, validate  # noqa: E402
from moetrain.runtime import init_runtime  # noqa: E402
from moetrain.trainer import Trainer  # noqa: E402

MODES = ("none", "sync", "async")


def build(run_dir: Path, overrides: list[str], steps: int) -> Trainer:
    cfg = to_object(compose(["+experiment=tiny", "logging.progress=false", "train.eval_every=0",
                             "checkpoint.every=0", "checkpoint.keep_last=2",
                             f"train.max_steps={steps}", f"run.dir={run_dir}", *overrides]))
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, init_runtime(cfg), run_dir)


def run_mode(mode: str, root: Path, overrides: list[str], steps: int, every: int,
             warmup: int) -> dict:
    trainer = build(root / mode, overrides, steps)
    step_ms, block_ms, save_ms = [], [], []
    after_save_ms = []  # train_step times of the step right after a save
    saved_last = False
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(trainer.sampler.next_step())
        t1 = time.perf_counter()
        trainer.state.step += 1
        trainer.state.consumed_tokens += trainer.tokens_per_step
        trainer.ckpt.poll()
        due = mode != "none" and trainer.state.step % every == 0
        if due:
            s0 = time.perf_counter()
            trainer.save_checkpoint(background=mode == "async")
            s1 = time.perf_counter()
        t2 = time.perf_counter()
        if i >= warmup:
            step_ms.append((t1 - t0) * 1e3)
            block_ms.append((t2 - t1) * 1e3)
            if due:
                save_ms.append((s1 - s0) * 1e3)
            if saved_last:
                after_save_ms.append((t1 - t0) * 1e3)
        saved_last = due
    w0 = time.perf_counter()
    trainer.ckpt.wait()
    final_wait_ms = (time.perf_counter() - w0) * 1e3
    if mode != "none":
        assert trainer.ckpt.latest() is not None, f"{mode}: no checkpoint was committed"
    return dict(step_ms=step_ms, block_ms=block_ms, save_ms=save_ms, after_save_ms=after_save_ms,
                final_wait_ms=[final_wait_ms] if mode == "async" else [])


def summarize(mode: str, runs: list[dict]) -> dict:
    """Pool the per-step times of every repeat of one mode."""
    def pool(key):
        return [v for run in runs for v in run[key]]

    step_ms, block_ms, save_ms = pool("step_ms"), pool("block_ms"), pool("save_ms")
    after_save_ms, waits = pool("after_save_ms"), pool("final_wait_ms")
    n = len(step_ms)
    return dict(
        mode=mode, repeats=len(runs), steps=n, saves=len(save_ms),
        step_ms_mean=statistics.mean(step_ms), step_ms_median=statistics.median(step_ms),
        step_after_save_ms_mean=statistics.mean(after_save_ms) if after_save_ms else None,
        save_block_ms_mean=statistics.mean(save_ms) if save_ms else 0.0,
        loop_ms_per_step=(sum(step_ms) + sum(block_ms)) / n,
        final_wait_ms=statistics.mean(waits) if waits else 0.0,
    )


def table(results: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["| mode | steps counted | saves | step ms (mean) | step ms (median) | step after a save ms | "
             "save call blocks ms | loop ms / step | final wait ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['steps']} | {r['saves']} | {f(r['step_ms_mean'])} | "
                     f"{f(r['step_ms_median'])} | {f(r['step_after_save_ms_mean'])} | "
                     f"{f(r['save_block_ms_mean'])} | {f(r['loop_ms_per_step'])} | "
                     f"{f(r['final_wait_ms'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.global_batch_size=4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the modes this many times, interleaved, and pool their steps")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        raise SystemExit("error: --steps must exceed --warmup")
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        runs = {m: [] for m in a.modes}
        for r in range(a.repeats):  # interleaved: a slow spell on a shared machine hits all modes
            for m in a.modes:
                runs[m].append(run_mode(m, Path(tmp) / f"r{r}", a.overrides, a.steps,
                                        a.save_every, a.warmup))
        results = [summarize(m, runs[m]) for m in a.modes]
    print(f"tiny experiment {' '.join(a.overrides)}: {a.repeats} x {a.steps} steps per mode "
          f"({a.warmup} warm-up steps per run not counted), a save every {a.save_every} steps")
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(dict(overrides=a.overrides, steps=a.steps,
                                          save_every=a.save_every, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
