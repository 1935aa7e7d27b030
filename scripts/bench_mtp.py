"""Multi-token prediction and document masking at equal steps, side by side on one machine:
main-token validation loss and step time of MTP depth 0 / 1 with document masking off / on,
for each model and seed (docs/mtp.md has the recorded table).

    python scripts/bench_mtp.py --models tiny --steps 10 --eval-batches 2 --out docs/mtp_bench_tiny.json
    python scripts/bench_mtp.py --models wide --steps 10 --eval-batches 2 --out docs/mtp_bench_wide.json
                                                                      (the recorded runs)
    python scripts/bench_mtp.py --models tiny --seeds 1 --steps 4 --eval-batches 1 --out x.json

Trains on short documents (scripts/make_documents.py: the shipped corpus's paragraphs, several
documents per 128-token window) so that masking changes what attention sees. Every run is the
real Trainer (`python -m moetrain.train` as a library) in this process, one after another: for
each seed and model the four variants run back to back, so a change of the machine's load
hits them alike. Reported per run: val_loss (the mean next-token loss over `--eval-batches`
validation batches after the last step; the MTP loss is not in it), val_mtp_loss/1, the median
step time over the steps after the first (which includes start-up work), the final train
loss and the host's 1-minute load average before the run (a shared host's step times are only
comparable between runs under the same load). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny": ["+experiment=tiny"],  # d 128, 4 layers (1 dense), 8 experts of 192, top-2
    # A wider CPU-sized MoE: d 256, 4 layers (1 dense), 16 experts of 256 top-2, a shared expert.
    "wide": ["+experiment=tiny", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
             "model.ffn_hidden=768", "model.moe.num_experts=16", "model.moe.expert_hidden=256",
             "model.moe.num_shared_experts=1"],
}
VARIANTS = {
    "mtp0": [],
    "mtp1": ["model.mtp.depth=1"],
    "mtp0-docmask": ["data.document_mask=true"],
    "mtp1-docmask": ["model.mtp.depth=1", "data.document_mask=true"],
}


def run_one(overrides: list[str], run_dir: Path) -> dict:
    from moetrain.config import compose, to_object, validate
    from moetrain.runtime import init_runtime
    from moetrain.trainer import Trainer

    cfg = to_object(compose(overrides + [f"run.dir={run_dir}"]))
    validate(cfg)
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, init_runtime(cfg), run_dir)
    start = time.monotonic()
    trainer.fit()
    wall = time.monotonic() - start
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    return {"val_loss": last["val_loss"], "val_mtp_loss_1": last.get("val_mtp_loss/1"),
            "train_loss": last["loss"],
            "step_time_s": statistics.median(r["step_time_s"] for r in recs[1:]),
            "wall_s": wall, "steps": len(recs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,wide")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="train.global_batch_size (one micro-batch)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"error: --models: unknown {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    import make_documents  # scripts/: the documents corpus
    from moetrain.data.prepare import default_cache_root

    work = Path(tempfile.mkdtemp(prefix="bench_mtp_"))
    # Written once where its prepared data is cached too (the same file as tests/documents.py).
    corpus = default_cache_root() / "documents" / "speeches.jsonl"
    if not corpus.is_file():
        make_documents.write(corpus)
    common = [f"data.sources=[{{path: '{corpus}'}}]", f"train.max_steps={args.steps}",
              f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
              f"train.eval_every={args.steps}", f"train.eval_batches={args.eval_batches}",
              "checkpoint.every=0", "logging.progress=false", "train.device=cpu",
              "train.dtype=fp32"]
    import torch

    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for model in models:
            for variant, extra in VARIANTS.items():
                run_dir = work / f"{model}-{variant}-s{seed}"
                load = os.getloadavg()[0]
                r = run_one([*MODELS[model], *common, f"train.seed={seed}", *extra], run_dir)
                r.update(model=model, variant=variant, seed=seed, load_before=round(load, 2))
                results.append(r)
                print(json.dumps(r), flush=True)
    report = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "command": "python scripts/bench_mtp.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "eval_batches": args.eval_batches, "runs": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0


def table(report: dict) -> str:
    lines = ["| model | seed | variant | val_loss (main token) | val MTP loss | step time (s) |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        mtp = f"{r['val_mtp_loss_1']:.4f}" if r["val_mtp_loss_1"] is not None else "-"
        lines.append(f"| {r['model']} | {r['seed']} | {r['variant']} | {r['val_loss']:.4f} | "
                     f"{mtp} | {r['step_time_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
