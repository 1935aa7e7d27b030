"""Time the expert-parallel all-to-all dispatch (TokenDispatcher + AllToAllExchange) at several EP sizes.

    python scripts/bench_dispatcher.py [--ranks 2 4 8] [--tokens 2048] [--dim 256] [--experts 16]
                                       [--top-k 2] [--iters 20] [--warmup 3] [--device cpu|cuda]
                                       [--dtype fp32|bf16] [--json OUT]

For each rank count W, W processes are forked with EP = W; each times dispatch + combine of its
own random tokens (identity experts: only the data movement and the local permute / unpermute),
forward and forward + backward, and the table shows the slowest rank's median with the rows
and bytes each rank sends. What is measured and how to read it (on fewer cores than ranks the
times are scheduling, not bandwidth): docs/expert_parallel.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import DTYPES, synchronize, time_iterations  # noqa: E402
from moetrain.model.moe.router import RouterOutput  # noqa: E402
from moetrain.model.moe.dispatcher import TokenDispatcher  # noqa: E402
from moetrain.parallel.expert_parallel import AllToAllExchange  # noqa: E402


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
                                timeout=timedelta(seconds=120))
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


def run_ranks(fn, world: int, *args, backend: str = "gloo", timeout: float = 600.0) -> list:
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
def random_routing(tokens: int, experts: int, top_k: int, gen: torch.Generator,
                   device: torch.device) -> RouterOutput:
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    scores = logits.softmax(-1)
    weight, idx = scores.topk(top_k, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    return RouterOutput(logits_TE=logits, scores_TE=scores, topk_weight_TK=weight, topk_idx_TK=idx)


def bench_rank(rank: int, world: int, opts: dict) -> dict:
    device = torch.device(f"cuda:{rank}") if opts["device"] == "cuda" else torch.device("cpu")
    dtype = DTYPES[opts["dtype"]]
    gen = torch.Generator().manual_seed(1000 + rank)
    routing = random_routing(opts["tokens"], opts["experts"], opts["top_k"], gen, device)
    x = torch.randn(opts["tokens"], opts["dim"], generator=gen).to(device, dtype)
    disp = TokenDispatcher(opts["experts"],
                           exchange=AllToAllExchange(opts["experts"], dist.group.WORLD))

    def forward(inp):
        rows, _, handle = disp.dispatch(inp, routing)
        return disp.combine(rows, handle)  # identity experts: data movement only

    def fwd():
        with torch.no_grad():
            forward(x)

    xg = x.detach().clone().requires_grad_(True)

    def fwd_bwd():
        forward(xg).sum().backward()

    def drop_grad():
        xg.grad = None

    # One checked pass: identity experts + normalized weights give x back.
    rows, _, handle = disp.dispatch(x, routing)
    out = disp.combine(rows, handle)
    torch.testing.assert_close(out.float(), x.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)
    send, recv = list(handle.exchange.send_splits), list(handle.exchange.recv_splits)
    dist.barrier()
    fwd_ms = time_iterations(fwd, device, opts["iters"], opts["warmup"])
    dist.barrier()
    bwd_ms = time_iterations(fwd_bwd, device, opts["iters"], opts["warmup"], before=drop_grad)
    synchronize(device)
    elem = torch.empty((), dtype=dtype).element_size()
    return dict(
        rank=rank, send_splits=send, recv_splits=recv,
        rows_sent=sum(send), rows_recv=sum(recv),
        rows_sent_remote=sum(send) - send[rank], rows_recv_remote=sum(recv) - recv[rank],
        bytes_sent=sum(send) * opts["dim"] * elem, bytes_recv=sum(recv) * opts["dim"] * elem,
        element_size=elem,
        fwd_ms=statistics.median(fwd_ms), fwd_bwd_ms=statistics.median(bwd_ms),
    )


# ------------------------------------------------------------------ report
def summarize(world: int, per_rank: list[dict]) -> dict:
    return dict(
        ranks=world,
        rows_sent_mean=statistics.mean(r["rows_sent"] for r in per_rank),
        rows_sent_remote_mean=statistics.mean(r["rows_sent_remote"] for r in per_rank),
        rows_recv_max=max(r["rows_recv"] for r in per_rank),
        bytes_sent_mean=statistics.mean(r["bytes_sent"] for r in per_rank),
        bytes_recv_max=max(r["bytes_recv"] for r in per_rank),
        fwd_ms=max(r["fwd_ms"] for r in per_rank),
        fwd_bwd_ms=max(r["fwd_bwd_ms"] for r in per_rank),
        per_rank=per_rank,
    )


def table(results: list[dict]) -> str:
    lines = [
        "| ranks (EP) | rows sent / rank | of which off-rank | KiB sent / rank | "
        "rows recv (max rank) | KiB recv (max rank) | fwd ms | fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results:
        lines.append(
            f"| {s['ranks']} | {s['rows_sent_mean']:.0f} | {s['rows_sent_remote_mean']:.0f} | "
            f"{s['bytes_sent_mean'] / 1024:.1f} | {s['rows_recv_max']} | "
            f"{s['bytes_recv_max'] / 1024:.1f} | {s['fwd_ms']:.2f} | {s['fwd_bwd_ms']:.2f} |")
    return "\n".join(lines)


def device_text(device: str, ranks: list[int]) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x {max(ranks)} (NCCL)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    backend = "gloo"
    if a.device == "cuda":
        n = torch.cuda.device_count()
        if n < max(a.ranks):
            raise SystemExit(f"error: --device cuda needs {max(a.ranks)} GPUs, {n} visible")
        backend = "nccl"
    for w in a.ranks:
        if a.experts % w:
            raise SystemExit(f"error: --experts {a.experts} is not divisible by {w} ranks")
    opts = dict(tokens=a.tokens, dim=a.dim, experts=a.experts, top_k=a.top_k, iters=a.iters,
                warmup=a.warmup, device=a.device, dtype=a.dtype)
    results = []
    for w in a.ranks:
        results.append(summarize(w, run_ranks(bench_rank, w, opts, backend=backend)))
    dev = device_text(a.device, a.ranks)
    print(f"TokenDispatcher + AllToAllExchange dispatch+combine: {a.tokens} tokens/rank, dim {a.dim}, "
          f"{a.experts} experts, top-{a.top_k}, {a.dtype}, median of {a.iters} iters "
          f"(slowest rank); device: {dev}")
    print(table(results))
    if a.json is not None:
        a.json.write_text(json.dumps(dict(options=opts, device=dev, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
