"""Global- vs micro-batch load balancing on the tiny model: validation loss and expert
specialisation by source (docs/lbl_experiment.md).

    python scripts/lbl_experiment.py [--steps N] [--out DIR] [--coeff C] [--reuse]

Trains `+experiment=tiny` twice in concurrent subprocesses, identical except
`model.moe.lbl.scope` (micro | global); then, per final checkpoint and MoE layer, measures how
much the routing depends on the source file (mutual information with a shuffled-label null,
moetrain/metrics/specialisation.py). Writes DIR/lbl_experiment.json and prints a markdown
table. Method and caveats: docs/lbl_experiment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moetrain.checkpoint.convert import load_model_state  # noqa: E402
from moetrain.config import compose, to_object  # noqa: E402
from moetrain.data import ensure_prepared, load_prepared_tokenizer, resolve_sources  # noqa: E402
from moetrain.metrics.specialisation import mutual_information, specialisation_summary  # noqa: E402
from moetrain.model.moe import MoELayer, Router  # noqa: E402
from moetrain.model.transformer import Transformer  # noqa: E402

SCOPES = ("micro", "global")
NULL_PERMUTATIONS = 200


def overrides(scope: str, args) -> list[str]:
    return [
        "+experiment=tiny",
        f"model.moe.lbl.scope={scope}",
        f"model.moe.lbl.coeff={args.coeff}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"train.eval_batches={args.eval_batches}",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"checkpoint.every={args.steps}",
        "logging.progress=false",
    ]


def train(scopes: list[str], out: Path, args) -> dict[str, float]:
    """Train the given scopes concurrently (one process each, args.threads threads each)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    procs, t0, wall = {}, time.time(), {}
    for scope in scopes:
        cmd = [sys.executable, "-m", "moetrain.train", *overrides(scope, args),
               f"run.dir={out / f'run_{scope}'}"]
        log = open(out / f"train_{scope}.log", "w")
        procs[scope] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log)
    for scope, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        wall[scope] = time.time() - t0
        if rc:
            raise SystemExit(f"training {scope} failed (rc={rc}); see {out}/train_{scope}.log")
    return wall


def read_metrics(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def source_windows(cfg, windows: int) -> tuple[list[str], torch.Tensor]:
    """[S, windows, seq_len] token ids: the last windows*seq_len tokens of every corpus file."""
    prepared = ensure_prepared(cfg.data, cfg.model.vocab_size)
    tok = load_prepared_tokenizer(prepared)
    files = [f.path for source in resolve_sources(cfg.data) for f in source.resolve()[1]]
    L = cfg.data.seq_len
    names, rows = [], []
    for f in files:
        ids = tok.encode(f.read_text(encoding="utf-8"))
        need = windows * L
        if len(ids) < need:
            raise ValueError(f"{f.name}: {len(ids)} tokens < {need}")
        rows.append(torch.tensor(ids[-need:], dtype=torch.long).view(windows, L))
        names.append(f.stem)
    return names, torch.stack(rows)


@torch.no_grad()
def analyse(cfg, ckpt: Path, names: list[str], tokens_SWL: torch.Tensor) -> dict:
    model = Transformer(cfg.model)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    # Buffers that are not persisted (e.g. rope tables) may be missing; weights must not be.
    bad = [k for k in missing if not k.endswith(("freqs_cis", "rope_cache", "inv_freq"))]
    if bad or unexpected:
        raise RuntimeError(f"state mismatch: missing={bad} unexpected={unexpected}")
    model.eval()
    routers = [m.router for m in model.modules() if isinstance(m, MoELayer)]
    E = cfg.model.moe.num_experts
    S = len(names)
    W = tokens_SWL.shape[1]
    counts = np.zeros((len(routers), S, W, E), dtype=np.int64)  # per window
    current = {"s": 0}

    def hook(idx):
        def fn(module: Router, inputs, out):
            per_window = out.topk_idx_TK.reshape(W, -1)
            for w in range(W):
                ids = per_window[w][per_window[w] < E]  # real experts (no null experts here)
                counts[idx, current["s"], w] += np.bincount(ids.numpy(), minlength=E)[:E]
        return fn

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    losses = []
    for s in range(S):
        current["s"] = s
        x = tokens_SWL[s]
        logits = model(x[:, :-1])
        losses.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      x[:, 1:].reshape(-1)).item())
    for h in handles:
        h.remove()
    layers = []
    rng = np.random.default_rng(0)
    for i in range(len(routers)):
        summary = specialisation_summary(counts[i].sum(1))
        # Null: the same windows with source labels shuffled (whole windows, so token
        # correlation within a window is kept): the MI that finite samples give by chance.
        flat = counts[i].reshape(S * W, E)
        null = [mutual_information(flat[rng.permutation(S * W)].reshape(S, W, E).sum(1))
                for _ in range(NULL_PERMUTATIONS)]
        summary["mi_null_mean"] = float(np.mean(null))
        summary["mi_null_p95"] = float(np.quantile(null, 0.95))
        layers.append(summary)
    return {"layers": layers, "counts": counts.sum(2).tolist(), "source_lm_loss": dict(zip(names, losses)),
            "mean_source_lm_loss": float(np.mean(losses))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("outputs/lbl_experiment"))
    ap.add_argument("--coeff", type=float, default=0.01)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--windows", type=int, default=8, help="seq_len windows per source")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per training run")
    ap.add_argument("--reuse", action="store_true", help="skip training where a final checkpoint exists")
    args = ap.parse_args()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))

    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "runs": {}}
    names = tokens = None
    final = {s: out / f"run_{s}" / "checkpoints" / f"step_{args.steps}" for s in SCOPES}
    todo = [s for s in SCOPES if not (args.reuse and (final[s] / ".metadata").exists())]
    walls = train(todo, out, args) if todo else {}
    for scope in SCOPES:
        run_dir = out / f"run_{scope}"
        ckpt = final[scope]
        wall = walls.get(scope)
        cfg = to_object(compose(overrides(scope, args)))
        if names is None:
            names, tokens = source_windows(cfg, args.windows)
        metrics = read_metrics(run_dir)
        last = metrics[-1]
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        tail = metrics[-20:]
        run = {
            "run_dir": str(run_dir), "train_wall_s": wall,
            "val_loss": vals[-1] if vals else None,
            "final_lm_loss": last["lm_loss"],
            "final_load_cv": last["load_cv"],
            "load_cv_last20_mean": float(np.mean([m["load_cv"] for m in tail])),
            "aux_loss_last20_mean": float(np.mean([m["aux_loss"] for m in tail])),
            **analyse(cfg, ckpt, names, tokens),
        }
        result["runs"][scope] = run
    result["sources"] = names
    (out / "lbl_experiment.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def table(result: dict) -> str:
    r = result["runs"]
    lines = ["| metric | " + " | ".join(SCOPES) + " |", "|---|" + "---|" * len(SCOPES)]

    def row(name, fn, fmt="{:.4f}"):
        lines.append(f"| {name} | " + " | ".join(fmt.format(fn(r[s])) for s in SCOPES) + " |")

    row("val_loss (metrics.jsonl)", lambda x: x["val_loss"])
    row("final load_cv", lambda x: x["final_load_cv"])
    row("load_cv, mean of last 20 steps", lambda x: x["load_cv_last20_mean"])
    row("LM loss on per-source slices", lambda x: x["mean_source_lm_loss"])
    n_layers = len(r[SCOPES[0]]["layers"])
    for i in range(n_layers):
        row(f"MoE layer {i}: I(source; expert) [nats]", lambda x: x["layers"][i]["mutual_information"])
        row(f"MoE layer {i}: MI, shuffled-source null mean (p95)",
            lambda x: (x["layers"][i]["mi_null_mean"], x["layers"][i]["mi_null_p95"]),
            "{0[0]:.4f} ({0[1]:.4f})")
        row(f"MoE layer {i}: MI / H(expert)", lambda x: x["layers"][i]["mi_over_h_expert"])
        row(f"MoE layer {i}: mean max expert share", lambda x: x["layers"][i]["mean_max_share"])
    row("mean over layers: I(source; expert)",
        lambda x: float(np.mean([l["mutual_information"] for l in x["layers"]])))
    row("mean over layers: mean max expert share",
        lambda x: float(np.mean([l["mean_max_share"] for l in x["layers"]])))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
