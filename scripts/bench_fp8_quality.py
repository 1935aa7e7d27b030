"""FP8 training quality on the CPU: validation loss after N steps of each emulated recipe against
the same run without FP8 (fp32), side by side in one invocation (docs/fp8.md, "Quality").

    python scripts/bench_fp8_quality.py                         # tiny and wide, 200 steps
    python scripts/bench_fp8_quality.py --models tiny --steps 50 --out /tmp/q

Each (model, recipe) is `python -m moetrain.train` with the model's overrides, `train.fp8=`
the recipe and the same seed, data and batches (by default one micro-batch of 8 sequences of
64 tokens a step: emulated FP8 costs 1.2-2x fp32 on the CPU); the runs of one model go
concurrently (one thread each), the models one after the other. Writes OUT/fp8_quality.json (every run's
validation losses, wall time, the machine and its load) and prints a markdown table: the final
validation loss of each recipe and its relative difference from `none` (the criterion: within
1%), next to the control `none-2mb` (module constant CONTROL) that shows how far a mere
rounding difference moves it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("none", "tensorwise", "rowwise", "mxfp8")
# The control: `none` with the batch in two micro-batches - the same training up to fp32
# summation order, so its distance from `none` is what a rounding-level perturbation alone does
# to the validation loss after N steps (training amplifies it).
CONTROL = "none-2mb"
MODELS = {
    # the tiny experiment: d 128, 4 layers (1 dense), 8 experts of width 192, top-2
    "tiny": ["+experiment=tiny"],
    # a wider CPU-sized MoE: d 256, 16 experts of width 256, top-2
    "wide": ["+experiment=tiny", "model.d_model=256", "model.ffn_hidden=768",
             "model.moe.num_experts=16", "model.moe.expert_hidden=256"],
}


def run_overrides(model: str, recipe: str, args, run_dir: Path) -> list[str]:
    micro = args.global_batch // 2 if recipe == CONTROL else args.global_batch
    return [*MODELS[model], f"train.fp8={'none' if recipe == CONTROL else recipe}",
            f"train.max_steps={args.steps}", f"train.global_batch_size={args.global_batch}",
            f"train.micro_batch_size={micro}", f"data.seq_len={args.seq_len}",
            f"train.eval_every={args.eval_every}", f"train.eval_batches={args.eval_batches}",
            "train.device=cpu", "train.dtype=fp32", f"train.seed={args.seed}",
            "checkpoint.every=0", "logging.progress=false", f"run.dir={run_dir}"]


def val_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            out[rec["step"]] = rec["val_loss"]
    return out


def load_average() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--recipes", default=",".join((*RECIPES, CONTROL)),
                   help="comma list of " + ", ".join((*RECIPES, CONTROL)))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    # 8 x 64 tokens a step (one micro-batch): emulated FP8 costs 2-3x fp32 on the CPU
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="outputs/fp8_quality")
    args = p.parse_args(argv)
    models, recipes = args.models.split(","), args.recipes.split(",")
    bad = [m for m in models if m not in MODELS] + [r for r in recipes
                                                    if r not in (*RECIPES, CONTROL)]
    if bad or "none" not in recipes or args.steps < 1 or args.eval_every < 1:
        print(f"error: unknown model/recipe {bad}, or --recipes without none, or a count < 1",
              file=sys.stderr)
        return 2
    if args.steps % args.eval_every:
        print(f"error: --steps {args.steps} must be a multiple of --eval-every {args.eval_every} "
              "(the final step must evaluate)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # the runs start in the repository root
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores",
              "command": "python scripts/bench_fp8_quality.py " + " ".join(argv or sys.argv[1:]),
              "steps": args.steps, "load_average_start": load_average(), "runs": {}}
    for model in models:
        procs, start = {}, time.time()
        for recipe in recipes:
            run_dir = out / f"{model}-{recipe}"
            if run_dir.exists():
                print(f"error: {run_dir} exists; choose another --out", file=sys.stderr)
                return 2
            cmd = [sys.executable, "-m", "moetrain.train",
                   *run_overrides(model, recipe, args, run_dir)]
            log = open(out / f"{model}-{recipe}.log", "w")
            procs[recipe] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT), log, cmd)
        while procs:
            for recipe, (proc, log, cmd) in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del procs[recipe]
                entry = {"rc": rc, "wall_s": round(time.time() - start, 1),
                         "command": " ".join(["python", *cmd[1:]])}
                if rc == 0:
                    entry["val_loss"] = val_losses(out / f"{model}-{recipe}")
                report["runs"][f"{model}/{recipe}"] = entry
                print(f"{model}/{recipe}: exit {rc} after {entry['wall_s']} s", flush=True)
            time.sleep(1)
    report["load_average_end"] = load_average()
    (out / "fp8_quality.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{report['date']}; {report['machine']}; load average {report['load_average_start']}"
          f" -> {report['load_average_end']}\n")
    print("| model | recipe | val loss @" + " | @".join(str(s) for s in range(
        args.eval_every, args.steps + 1, args.eval_every)) + " | final vs none | wall s |")
    print("|---|---|" + "---|" * (args.steps // args.eval_every) + "---|---|")
    failed = False
    for model in models:
        base = report["runs"][f"{model}/none"].get("val_loss", {})
        for recipe in recipes:
            entry = report["runs"][f"{model}/{recipe}"]
            losses = entry.get("val_loss")
            if not losses:
                print(f"| {model} | {recipe} | failed (exit {entry['rc']}) |")
                failed = True
                continue
            final = losses[args.steps]
            rel = (final - base[args.steps]) / base[args.steps] if base else float("nan")
            cells = " | ".join(f"{losses[s]:.4f}" for s in sorted(losses))
            print(f"| {model} | {recipe} | {cells} | {100 * rel:+.2f}% | {entry['wall_s']:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
