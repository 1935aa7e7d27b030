"""Muon against AdamW, measured side by side: quality (validation loss per step) and cost
(optimizer-step time and bytes communicated). Results and how to read them: docs/optimizers.md.

    python scripts/bench_optim.py quality [--models tiny wide] [--steps 300] [--seeds 0 1]
        [--lr-adamw 1e-3 3e-3 1e-2 3e-2] [--lr-muon 1e-3 3e-3 1e-2 3e-2] [--workers 2] [--out DIR]
        [--json FILE]
    python scripts/bench_optim.py cost [--ranks 1 2 4] [--layouts fsdp ep] [--experts 8]
        [--d-model 2048] [--heads 16] [--expert-hidden 1024] [--warmup 1] [--iters 2]
        [--device cpu|cuda] [--plan-experts 64] [--json FILE]

quality: every optimizer at every learning rate on the first seed (a sweep), then the best
learning rate (lowest final validation loss) on the other seeds; each run is the command line
(`python -m moetrain.train`) on the shipped corpus, evaluating every `--eval-every` steps.
Reported per model and seed: AdamW's final validation loss, Muon's, and the first evaluation
step at which Muon reaches AdamW's final loss (AdamW's steps / that step = Muon's token
efficiency; published: 1.2-2x).

cost: one transformer block at the OLMoE-1B-7B shape (d_model 2048, 16 heads, experts of width
1024; `--experts` of its 64 on a CPU) on W forked ranks (gloo on the CPU; one GPU: W = 1),
parallelized as the trainer does - `fsdp`: FSDP over the W ranks; `ep`: experts over the W
ranks (EP = W), the dense weights under FSDP. Random gradients, then optimizer.step() timed
(the slowest rank's median) for AdamW and for Muon, with the bytes each rank sends per step
(counted on the collectives) and the optimizer state per rank; `--plan-experts` gives the
bytes per step of the whole-matrix plan at the full expert count (built on the meta device,
nothing allocated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moetrain.metrics.timing import synchronize  # noqa: E402

# -- quality ----------------------------------------------------------------------------------

# The tiny experiment, and a wider CPU-sized MoE (2x the width, 2x the expert width).
MODELS = {
    "tiny": [],
    "wide": ["model.d_model=256", "model.ffn_hidden=768", "model.moe.expert_hidden=384"],
}
QUALITY = ["+experiment=tiny", "train.global_batch_size=8", "train.micro_batch_size=8",
           "data.seq_len=64", "train.eval_batches=2", "checkpoint.every=0",
           "logging.progress=false", "train.device=cpu", "optim.warmup_steps=20"]


def _train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """One command-line run (one thread); its metrics.jsonl records."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():  # a finished run is reused (an interrupted sweep goes on)
        partial = run_dir.parent / (run_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, "-m", "moetrain.train", *overrides,
                               f"run.dir={partial}"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{run_dir.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        partial.rename(run_dir)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _val_curve(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluation step whose validation loss is <= target (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def quality(args) -> dict:
    out = Path(args.out).resolve()  # the runs start in the repository root
    out.mkdir(parents=True, exist_ok=True)
    lrs = {"adamw": args.lr_adamw, "muon": args.lr_muon}

    def job(model: str, optim: str, lr: float, seed: int):
        name = f"{model}-{optim}-lr{lr:g}-seed{seed}"
        overrides = [*QUALITY, *MODELS[model], f"optim={optim}", f"optim.lr={lr}",
                     f"train.seed={seed}", f"train.max_steps={args.steps}",
                     f"train.eval_every={args.eval_every}"]
        t0 = time.monotonic()
        records = _train(out / name, overrides)
        print(f"  {name}: final val {_val_curve(records)[-1][1]:.4f} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
        return (model, optim, lr, seed), records

    runs: dict = {}
    with ThreadPoolExecutor(args.workers) as pool:  # each job is its own process
        first = [(m, o, lr, args.seeds[0]) for m in args.models for o in lrs for lr in lrs[o]]
        for key, records in pool.map(lambda k: job(*k), first):
            runs[key] = records
        best = {(m, o): min(lrs[o], key=lambda lr: _val_curve(runs[(m, o, lr, args.seeds[0])])[-1][1])
                for m in args.models for o in lrs}
        rest = [(m, o, best[(m, o)], s) for m in args.models for o in lrs for s in args.seeds[1:]]
        for key, records in pool.map(lambda k: job(*k), rest):
            runs[key] = records
    result = {"steps": args.steps, "eval_every": args.eval_every, "seeds": args.seeds,
              "lrs": lrs, "models": {}, "machine": _machine()}
    for m in args.models:
        rows = []
        for s in args.seeds:
            adamw = _val_curve(runs[(m, "adamw", best[(m, "adamw")], s)])
            muon = _val_curve(runs[(m, "muon", best[(m, "muon")], s)])
            reach = first_step_reaching(muon, adamw[-1][1])
            rows.append({"seed": s, "adamw_final": adamw[-1][1], "muon_final": muon[-1][1],
                         "muon_reaches_adamw_final_at": reach,
                         "token_efficiency": None if reach is None else adamw[-1][0] / reach,
                         "adamw_curve": adamw, "muon_curve": muon})
        sweep = {o: {lr: _val_curve(runs[(m, o, lr, args.seeds[0])])[-1][1] for lr in lrs[o]}
                 for o in lrs}
        result["models"][m] = {"best_lr": {o: best[(m, o)] for o in lrs}, "sweep": sweep,
                               "seeds": rows}
    print(quality_table(result))
    return result


def quality_table(result: dict) -> str:
    lines = ["| model | seed | AdamW lr | Muon lr | AdamW final val | Muon final val | "
             f"Muon reaches AdamW's final at step | token efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in result["models"].items():
        for row in r["seeds"]:
            eff = row["token_efficiency"]
            lines.append(
                f"| {m} | {row['seed']} | {r['best_lr']['adamw']:g} | {r['best_lr']['muon']:g} | "
                f"{row['adamw_final']:.4f} | {row['muon_final']:.4f} | "
                f"{row['muon_reaches_adamw_final_at'] or 'never'} | "
                f"{'-' if eff is None else f'{eff:.2f}x'} |")
    lines.append("")
    lines.append("sweep (first seed, final validation loss): " + "; ".join(
        f"{m} {o} " + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in r["sweep"][o].items())
        for m, r in result["models"].items() for o in r["sweep"]))
    return "\n".join(lines)


# -- cost -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, reports, fn, args):
    torch.set_num_threads(1)  # forked children hang in the inherited intra-op pool otherwise
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=1800))
        report = (rank, True, pickle.dumps(fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        report = (rank, False, traceback.format_exc())
    reports.put(report)
    reports.close()
    reports.join_thread()
    try:
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0 if report[1] else 1)


def run_ranks(fn, world: int, *args, timeout: float = 3600.0) -> list:
    """fn(rank, world, *args) on `world` forked gloo ranks (or here, for one); results by rank."""
    if world == 1:  # here, with one intra-op thread like every forked rank
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(0, 1, *args)]
        finally:
            torch.set_num_threads(threads)
    ctx = mp.get_context("fork")
    reports = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, reports, fn, args))
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, ok, payload = reports.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"timeout after {timeout} s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def layer_config(args, world: int, layout: str, optim: str, experts: int):
    """One OLMoE-1B-7B-shaped block (vocabulary cut: the embedding is no layer's)."""
    from moetrain.config import compose, to_object

    overrides = ["+experiment=olmoe_1b_7b", "model.n_layers=1", "model.moe.first_dense_layers=0",
                 "model.vocab_size=256", f"model.d_model={args.d_model}",
                 f"model.n_heads={args.heads}", f"model.n_kv_heads={args.heads}",
                 f"model.moe.num_experts={experts}", f"model.moe.top_k={min(8, experts)}",
                 f"model.moe.expert_hidden={args.expert_hidden}", f"optim={optim}",
                 f"train.device={args.device}", "train.dtype=fp32"]
    if layout == "ep":
        overrides.append(f"parallel.ep={world}")
    return to_object(compose(overrides))


def _count_bytes():
    """Wrap dist.all_to_all_single: bytes this rank sends to other ranks (its own split kept)."""
    sent = [0]
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                 async_op=False):
        me = dist.get_rank(group)
        splits = input_split_sizes or [input.numel() // dist.get_world_size(group)] * \
            dist.get_world_size(group)
        sent[0] += (sum(splits) - splits[me]) * input.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, group, async_op)

    dist.all_to_all_single = counting
    return sent, lambda: setattr(dist, "all_to_all_single", original)


def _cost_rank(rank, world, args, layout: str) -> dict:
    from torch.distributed.tensor import DTensor

    from moetrain import memory
    from moetrain.optim import build_optimizer

    device = torch.device(args.device)
    out = {}
    for optim in ("adamw", "muon"):
        cfg = layer_config(args, world, layout, optim, args.experts)
        model = parallel_model(cfg, world, device)
        opt = build_optimizer(model, cfg.optim)
        gen = torch.Generator(device=device).manual_seed(rank)
        for p in model.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            g = torch.randn(local.shape, generator=gen, device=device) * 1e-3
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False) \
                if isinstance(p, DTensor) else g
        sent, restore = _count_bytes() if world > 1 else ([0], lambda: None)
        times = []
        try:
            for i in range(args.warmup + args.iters):
                if world > 1:
                    dist.barrier()
                synchronize(device)
                t0 = time.perf_counter()
                opt.step()
                synchronize(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                if i == args.warmup - 1:
                    sent[0] = 0
        finally:
            restore()
        out[optim] = {"step_s": statistics.median(times),
                      "sent_bytes_per_step": sent[0] / args.iters,
                      "state_bytes": memory.optimizer_bytes(opt),
                      "param_bytes": memory.parameter_bytes(model)}
        if optim == "muon":
            out["plan_bytes_per_step"] = opt.exchange.bytes_per_apply(2)["sent"]
        del model, opt
    if args.plan_experts and args.plan_experts != args.experts:
        out["plan_bytes_full"] = _plan_bytes(args, world, layout, args.plan_experts)
    return out


def _plan_bytes(args, world: int, layout: str, experts: int) -> int:
    """Bytes this rank sends per Muon step at `experts` experts: the plan of the meta model."""
    from moetrain.optim import route_parameters
    from moetrain.parallel.whole_matrices import MatrixExchange

    cfg = layer_config(args, world, layout, "muon", experts)
    model = parallel_model(cfg, world, torch.device("meta"))  # shapes and placements only
    return MatrixExchange(route_parameters(model)[0]).bytes_per_apply(2)["sent"]


def parallel_model(cfg, world: int, device: torch.device) -> torch.nn.Module:
    """This rank's model of `cfg` as the trainer builds it: on the meta device, `parallelize`d,
    then its shards allocated on `device` and initialised (on the meta device: left there)."""
    from moetrain.model import Transformer
    from moetrain.model.init import init_parameters
    from moetrain.parallel import ParallelDims
    from moetrain.parallel.mesh import build_meshes
    from moetrain.parallel.parallelize import BatchShape, parallelize
    from moetrain.parallel.rank import RankLayout

    dims = ParallelDims.from_config(cfg.parallel, world)
    meshes = build_meshes(dims, "cpu" if device.type == "meta" else device.type) if world > 1 \
        else None
    layout = RankLayout(dims, dist.get_rank() if world > 1 else 0, device, meshes)
    t = cfg.train
    batch = BatchShape(t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dims.dp),
                       cfg.data.seq_len)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model, _ = parallelize(model, layout, cfg.parallel, batch)
    if device.type != "meta":
        init_parameters(model, cfg.model, t.seed)
    return model


def cost(args) -> dict:
    rows = []
    for layout in args.layouts:
        for world in args.ranks:
            if layout == "ep" and world == 1:
                continue  # the same as fsdp on one rank
            t0 = time.monotonic()
            per_rank = run_ranks(_cost_rank, world, args, layout)
            row = {"layout": layout, "ranks": world}
            for optim in ("adamw", "muon"):
                row[f"{optim}_step_s"] = max(r[optim]["step_s"] for r in per_rank)
                row[f"{optim}_sent_bytes"] = max(r[optim]["sent_bytes_per_step"] for r in per_rank)
                row[f"{optim}_state_bytes"] = max(r[optim]["state_bytes"] for r in per_rank)
            row["muon_plan_bytes"] = max(r["plan_bytes_per_step"] for r in per_rank)
            if "plan_bytes_full" in per_rank[0]:
                row["muon_plan_bytes_full"] = max(r["plan_bytes_full"] for r in per_rank)
            rows.append(row)
            print(f"  {layout} x{world}: {time.monotonic() - t0:.0f} s", flush=True)
    result = {"shape": {"d_model": args.d_model, "heads": args.heads, "experts": args.experts,
                        "expert_hidden": args.expert_hidden, "plan_experts": args.plan_experts},
              "device": args.device, "rows": rows, "machine": _machine()}
    print(cost_table(result))
    return result


def cost_table(result: dict) -> str:
    def mib(b):
        return f"{b / 2**20:.1f}"
    s = result["shape"]
    lines = [f"one block: d_model {s['d_model']}, {s['heads']} heads, {s['experts']} experts of "
             f"width {s['expert_hidden']}; device {result['device']}",
             f"| layout | ranks | AdamW step s | Muon step s | Muon / AdamW | Muon sends MiB/step "
             f"(measured / plan) | at {s['plan_experts']} experts MiB | state MiB/rank AdamW / Muon |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        full = r.get("muon_plan_bytes_full", r["muon_plan_bytes"])
        lines.append(
            f"| {r['layout']} | {r['ranks']} | {r['adamw_step_s']:.3g} | {r['muon_step_s']:.3g} | "
            f"{r['muon_step_s'] / r['adamw_step_s']:.1f}x | {mib(r['muon_sent_bytes'])} / "
            f"{mib(r['muon_plan_bytes'])} | {mib(full)} | "
            f"{mib(r['adamw_state_bytes'])} / {mib(r['muon_state_bytes'])} |")
    return "\n".join(lines)


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
            "load_avg": load, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    q.add_argument("--steps", type=int, default=300)
    q.add_argument("--eval-every", type=int, default=10)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--lr-adamw", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    q.add_argument("--lr-muon", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--out", default="bench_optim_runs", help="run directories (reused)")
    c = sub.add_parser("cost")
    c.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    c.add_argument("--layouts", nargs="+", default=["fsdp", "ep"], choices=["fsdp", "ep"])
    c.add_argument("--experts", type=int, default=8)
    c.add_argument("--plan-experts", type=int, default=64)
    c.add_argument("--d-model", type=int, default=2048)
    c.add_argument("--heads", type=int, default=16)
    c.add_argument("--expert-hidden", type=int, default=1024)
    c.add_argument("--warmup", type=int, default=1)
    c.add_argument("--iters", type=int, default=2)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for sp in (q, c):
        sp.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.what == "cost":
        if args.device == "cuda" and args.ranks != [1]:
            p.error("--device cuda runs on one GPU: --ranks 1")
        if any(w > 1 and args.experts % w for w in args.ranks if "ep" in args.layouts):
            p.error("--experts must be divisible by every rank count (EP)")
    result = quality(args) if args.what == "quality" else cost(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
