"""Step time of one expert-parallel MoE layer with each exchange, side by side in one run.

    python scripts/bench_dispatcher.py [--ranks 2 4] [--tokens 2048] [--dim 1024]
                                       [--expert-hidden 64] [--experts 8] [--top-k 2]
                                       [--shared-hidden 256] [--budget 1.5] [--iters 10]
                                       [--warmup 2] [--device cpu|cuda] [--dtype fp32|bf16]
                                       [--json OUT]

For each rank count W, W processes are forked with EP = W; each builds the same MoE layer (router,
routed SwiGLU experts, one shared expert) four times - exact-size or sync-free exchange
(`model.moe.ep_budget`), overlap off or on (`model.moe.ep_overlap`) - and times forward +
backward of its own random tokens, the variants taking turns iteration by iteration (so a change
of machine load hits them alike). A step's time is the slowest rank's; the table shows the
median over iterations, the exchange alone (dispatch + combine with identity experts: the
all-to-alls and the local permutes) and its share of the exact step, the host reads per step
and, for the sync-free exchange, its padding and overflows. The default shape is chosen so that
the all-to-all is a visible share of the step (a wide model dim, narrow experts).
What CPU gloo can and cannot show: docs/expert_parallel.md, "Dispatch benchmark".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import queue
import socket
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import DTYPES, synchronize  # noqa: E402
from moetrain.config.schema import LBLConfig, MoEConfig  # noqa: E402
from moetrain.model.moe import MoELayer  # noqa: E402
from moetrain.parallel.expert_parallel import apply_expert_parallel  # noqa: E402

# (name, sync-free, overlap), in the order of the table
VARIANTS = (("exact", False, False), ("exact+overlap", False, True),
            ("sync-free", True, False), ("sync-free+overlap", True, True))


# ------------------------------------------------------------------ launcher (fork, like tests')
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, backend, reports, fn, args):
    torch.set_num_threads(1)  # forked children hang in the inherited intra-op pool otherwise
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=300))
        report = (rank, True, pickle.dumps(fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        report = (rank, False, traceback.format_exc())
    reports.put(report)
    reports.close()
    reports.join_thread()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0 if report[1] else 1)


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout: float = 1800.0) -> list:
    """Fork `world` ranks running fn(rank, world, *args); their results by rank (or raise)."""
    ctx = mp.get_context("fork")
    reports = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, backend, reports, fn, args))
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s ({world} ranks)")
            try:
                rank, ok, payload = reports.get(timeout=0.1)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code "
                                       f"{procs[dead[0]].exitcode} without a result")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


# ------------------------------------------------------------------ one rank
def moe_config(opts: dict, overlap: bool) -> MoEConfig:
    return MoEConfig(num_experts=opts["experts"], top_k=opts["top_k"],
                     expert_hidden=opts["expert_hidden"],
                     num_shared_experts=1 if opts["shared_hidden"] else 0,
                     shared_expert_hidden=opts["shared_hidden"] or None,
                     ep_budget=opts["budget"], ep_overlap=overlap,
                     lbl=LBLConfig(coeff=0.01))


class _HostReads:
    """Counts Tensor.tolist / .item calls while active (the exchange's host reads)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved = {}

    def __enter__(self):
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)


def bench_rank(rank: int, world: int, opts: dict) -> dict:
    device = torch.device(f"cuda:{rank}") if opts["device"] == "cuda" else torch.device("cpu")
    dtype = DTYPES[opts["dtype"]]
    mesh = init_device_mesh(device.type, (world, 1), mesh_dim_names=("ep", "etp"))
    torch.manual_seed(0)  # the same layer on every rank; each rank its own tokens
    base = MoELayer(opts["dim"], moe_config(opts, False)).to(device, dtype)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(1, opts["tokens"], opts["dim"], generator=gen).to(device, dtype)
    grad = torch.randn(1, opts["tokens"], opts["dim"], generator=gen).to(device, dtype)

    layers = {}
    for name, sync_free, overlap in VARIANTS:
        layer = MoELayer(opts["dim"], moe_config(opts, overlap)).to(device, dtype)
        layer.load_state_dict(base.state_dict())
        apply_expert_parallel(layer, mesh, sync_free=sync_free)
        layer.start_step(top_k=opts["top_k"], capacity_factor=None, aux_loss_scale=1.0,
                         ep_budget=opts["budget"] if sync_free else None)
        layers[name] = layer

    def step(layer):
        xi = x.detach().requires_grad_()
        layer(xi).backward(grad)
        for p in layer.parameters():
            p.grad = None

    def exchange_only(layer):  # identity experts: the all-to-alls and the local permutes
        xi = x.detach().requires_grad_()
        x_TD = xi.view(-1, opts["dim"])
        routing = layer.router(x_TD, opts["top_k"])
        y, _ = layer.dispatcher(x_TD, routing, lambda rows, counts, first: rows)
        y.backward(grad.view(-1, opts["dim"]))

    times = {name: [] for name in (*layers, "exchange only")}
    for i in range(opts["warmup"] + opts["iters"]):
        for name in times:
            fn = (lambda: exchange_only(layers["exact"])) if name == "exchange only" \
                else (lambda: step(layers[name]))
            synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= opts["warmup"]:
                times[name].append((time.perf_counter() - start) * 1e3)
    reads = {}
    for name, layer in layers.items():
        layer.exchange_stats.zero_()
        with _HostReads() as counter:
            step(layer)
        overflowed, need, rows, slots = layer.exchange_stats.tolist()
        reads[name] = dict(host_reads=counter.count, overflowed=overflowed, need=need,
                           rows=rows, slots=slots)
    return dict(rank=rank, times=times, per_variant=reads)


# ------------------------------------------------------------------ report
def summarize(world: int, per_rank: list[dict]) -> dict:
    names = list(per_rank[0]["times"])
    iters = len(per_rank[0]["times"][names[0]])
    # a step takes as long as its slowest rank; the median over iterations
    step_ms = {n: statistics.median(max(r["times"][n][i] for r in per_rank) for i in range(iters))
               for n in names}
    variants = {}
    for name, _, _ in VARIANTS:
        v = [r["per_variant"][name] for r in per_rank]
        variants[name] = dict(
            step_ms=step_ms[name], speedup_vs_exact=step_ms["exact"] / step_ms[name],
            host_reads_per_step=max(x["host_reads"] for x in v),
            wasted_rows_frac=(sum(x["slots"] - x["rows"] for x in v) / sum(x["slots"] for x in v)
                              if any(x["slots"] for x in v) else None),
            overflowed=any(x["overflowed"] for x in v), need=max(x["need"] for x in v))
    return dict(ranks=world, exchange_only_ms=step_ms["exchange only"],
                exchange_share=step_ms["exchange only"] / step_ms["exact"], variants=variants,
                per_rank=per_rank)


def table(results: list[dict]) -> str:
    lines = ["| ranks (EP) | exchange | step ms (fwd+bwd) | vs exact | host reads / step | "
             "padding rows | overflowed |",
             "|---|---|---|---|---|---|---|"]
    for s in results:
        for name, v in s["variants"].items():
            pad = "-" if v["wasted_rows_frac"] is None else f"{100 * v['wasted_rows_frac']:.0f} %"
            lines.append(f"| {s['ranks']} | {name} | {v['step_ms']:.1f} | "
                         f"{v['speedup_vs_exact']:.2f}x | {v['host_reads_per_step']} | {pad} | "
                         f"{'yes' if v['overflowed'] else 'no'} |")
    lines.append("")
    for s in results:
        lines.append(f"ep{s['ranks']}: exchange alone (identity experts) {s['exchange_only_ms']:.1f}"
                     f" ms = {100 * s['exchange_share']:.0f} % of the exact step")
    return "\n".join(lines)


def device_text(device: str, ranks: list[int]) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x {max(ranks)} (NCCL)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--expert-hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared-hidden", type=int, default=256,
                   help="width of the one shared expert (0: none)")
    p.add_argument("--budget", type=float, default=1.5, help="the sync-free exchange's budget")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    backend = "gloo"
    if a.device == "cuda":
        n = torch.cuda.device_count()
        if n < max(a.ranks):
            p.exit(2, f"error: --device cuda needs {max(a.ranks)} GPUs, {n} visible\n")
        backend = "nccl"
    for w in a.ranks:
        if w < 2 or a.experts % w:
            p.exit(2, f"error: --ranks {w}: needs 2 or more ranks dividing --experts {a.experts}\n")
    if not a.budget > 0 or a.iters < 1 or a.warmup < 0 or a.top_k > a.experts:
        p.exit(2, "error: --budget must be > 0, --iters >= 1, --warmup >= 0, --top-k <= --experts\n")
    opts = dict(tokens=a.tokens, dim=a.dim, expert_hidden=a.expert_hidden, experts=a.experts,
                top_k=a.top_k, shared_hidden=a.shared_hidden, budget=a.budget, iters=a.iters,
                warmup=a.warmup, device=a.device, dtype=a.dtype)
    load_before = os.getloadavg()
    results = [summarize(w, run_ranks(bench_rank, w, opts, backend=backend)) for w in a.ranks]
    load_after = os.getloadavg()
    dev = device_text(a.device, a.ranks)
    print(f"MoE layer step (forward + backward), EP over W ranks: {a.tokens} tokens/rank, dim "
          f"{a.dim}, {a.experts} experts of width {a.expert_hidden}, top-{a.top_k}, shared "
          f"expert {a.shared_hidden or 'none'}, {a.dtype}, budget {a.budget}; median of "
          f"{a.iters} iterations of the slowest rank; device: {dev}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(dict(options=opts, device=dev, load_before=load_before,
                                          load_after=load_after, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
