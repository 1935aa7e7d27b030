"""What one device can show of the sync-free expert exchange: host stalls per step with and without
the exchange's host reads, and a CUDA-graph capture of one MoE layer.

    python scripts/check_moe_graph.py [--device cuda|cpu] [--dtype bf16|fp32] [--layers 4]
                                      [--tokens 4096] [--dim 1024] [--experts 8]
                                      [--expert-hidden 512] [--top-k 2] [--budget 2.0]
                                      [--iters 10] [--warmup 3] [--json OUT]

One process, a process group of one rank (NCCL on CUDA, gloo on the CPU), so the expert-parallel
code path runs in full - counts all-to-all, row all-to-alls - with every expert local:

1. host stalls: a stack of `--layers` MoE layers (h = h + moe(h)), forward + backward, with the
   exact-size exchange (`.tolist()` of the split sizes in every layer's forward: the host waits
   for the device each time) and with the sync-free one (nothing read). Per step: the wall time
   (to a final synchronize), the time the host took to queue the step (returns from backward
   before the device is done when nothing stalls it), and the time spent inside host reads.
2. graph capture (CUDA only): one MoE layer with the sync-free exchange, forward and backward,
   through torch.cuda.make_graphed_callables; the replay must give the eager outputs and
   gradients, and is timed against eager. The exact-size exchange is tried too and is expected to
   fail to capture (a host read inside a capture is not allowed) - the reason for the
   sync-free path. On the CPU this part reports "unavailable".

Prints a summary and writes --json (what scripts/gpu_check.py records).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import DTYPES, synchronize  # noqa: E402
from moetrain.config.schema import LBLConfig, MoEConfig  # noqa: E402
from moetrain.model.moe import MoELayer, moe_layers  # noqa: E402
from moetrain.parallel.expert_parallel import apply_expert_parallel  # noqa: E402


class Stack(nn.Module):
    def __init__(self, layers: list[MoELayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = h + layer(h)
        return h


class HostReads(contextlib.AbstractContextManager):
    """Times every Tensor.tolist / .item call while active (the host waits inside them)."""

    def __init__(self) -> None:
        self.count, self.seconds, self._saved = 0, 0.0, {}

    def __enter__(self):
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def timed(t, *a, _original=original, **k):
                start = time.perf_counter()
                try:
                    return _original(t, *a, **k)
                finally:
                    self.count += 1
                    self.seconds += time.perf_counter() - start
            setattr(torch.Tensor, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)


def build(opts: dict, mesh, n_layers: int, sync_free: bool, device, dtype) -> Stack:
    cfg = MoEConfig(num_experts=opts["experts"], top_k=opts["top_k"],
                    expert_hidden=opts["expert_hidden"], ep_budget=opts["budget"],
                    lbl=LBLConfig(coeff=0.01))
    torch.manual_seed(0)
    layers = []
    for _ in range(n_layers):
        layer = MoELayer(opts["dim"], cfg).to(device, dtype)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
        layers.append(layer)
    model = Stack(layers)
    apply_expert_parallel(model, mesh, sync_free=sync_free)
    for layer in moe_layers(model):
        layer.start_step(top_k=opts["top_k"], capacity_factor=None, aux_loss_scale=1.0,
                         ep_budget=opts["budget"] if sync_free else None)
    return model


def host_stalls(opts: dict, mesh, device, dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, opts["tokens"], opts["dim"], generator=gen).to(device, dtype)
    out = {}
    for name, sync_free in (("exact", False), ("sync-free", True)):
        model = build(opts, mesh, opts["layers"], sync_free, device, dtype)
        walls, queued, stalls, reads = [], [], [], []
        for i in range(opts["warmup"] + opts["iters"]):
            synchronize(device)
            with HostReads() as hr:
                start = time.perf_counter()
                model(x.detach().requires_grad_()).float().square().mean().backward()
                queued_s = time.perf_counter() - start
            synchronize(device)
            wall_s = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if i >= opts["warmup"]:
                walls.append(wall_s * 1e3)
                queued.append(queued_s * 1e3)
                stalls.append(hr.seconds * 1e3)
                reads.append(hr.count)
        stats = sum(layer.exchange_stats for layer in moe_layers(model))
        out[name] = dict(step_ms=statistics.median(walls), queue_ms=statistics.median(queued),
                         host_read_ms=statistics.median(stalls), host_reads=max(reads),
                         overflowed=bool(stats[0] > 0))
    return out


def graph_capture(opts: dict, mesh, device, dtype) -> dict:
    if device.type != "cuda":
        return {"status": "unavailable", "note": "CUDA graphs need a GPU"}
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, opts["tokens"], opts["dim"], generator=gen).to(device, dtype)
    g = torch.randn(1, opts["tokens"], opts["dim"], generator=gen).to(device, dtype)
    result = {}
    for name, sync_free in (("sync-free", True), ("exact", False)):
        eager = build(opts, mesh, 1, sync_free, device, dtype)
        graphed_src = build(opts, mesh, 1, sync_free, device, dtype)
        xe = x.detach().requires_grad_()
        ye = eager(xe)
        ye.backward(g)
        entry: dict = {}
        try:
            xs = x.detach().requires_grad_()
            graphed = torch.cuda.make_graphed_callables(graphed_src, (xs,), num_warmup_iters=3)
            graphed_src.zero_grad(set_to_none=True)
            xr = x.detach().requires_grad_()
            yr = graphed(xr)
            yr.backward(g)
            torch.cuda.synchronize()
            same = torch.equal(yr, ye) and torch.equal(xr.grad, xe.grad) and all(
                torch.equal(_local(p.grad), _local(q.grad))
                for p, q in zip(graphed_src.parameters(), eager.parameters()))
            entry.update(status="ok", replay_equals_eager=same)
            entry["eager_ms"] = _time(lambda: eager(x.detach().requires_grad_()).backward(g),
                                      opts, device)
            entry["replay_ms"] = _time(lambda: graphed(x.detach().requires_grad_()).backward(g),
                                       opts, device)
        except Exception as err:  # noqa: BLE001 - a failed capture is a result, not a crash
            entry.update(status="failed", error=f"{type(err).__name__}: {err}"[:500],
                         expected=not sync_free)
            torch.cuda.synchronize()
        result[name] = entry
    return result


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _time(fn, opts: dict, device) -> float:
    for _ in range(opts["warmup"]):
        fn()
    synchronize(device)
    times = []
    for _ in range(opts["iters"]):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda: no GPU visible (use --device cpu)\n")
    if min(a.layers, a.tokens, a.dim, a.experts, a.expert_hidden, a.iters) < 1 or \
            not 1 <= a.top_k <= a.experts or not a.budget > 0 or a.warmup < 0:
        p.exit(2, "error: sizes and --iters must be positive, 1 <= --top-k <= --experts, "
                  "--budget > 0, --warmup >= 0\n")
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    if device.type == "cpu":  # a smoke run of the script: one intra-op thread, no oversubscription
        torch.set_num_threads(1)
    opts = dict(layers=a.layers, tokens=a.tokens, dim=a.dim, experts=a.experts,
                expert_hidden=a.expert_hidden, top_k=a.top_k, budget=a.budget, iters=a.iters,
                warmup=a.warmup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    report: dict = {"options": opts, "device": (torch.cuda.get_device_name(0)
                                                if device.type == "cuda" else "cpu"),
                    "dtype": a.dtype}
    try:
        mesh = init_device_mesh(device.type, (1, 1), mesh_dim_names=("ep", "etp"))
        report["host_stalls"] = host_stalls(opts, mesh, device, dtype)
        try:
            report["graph_capture"] = graph_capture(opts, mesh, device, dtype)
        except Exception:  # noqa: BLE001
            report["graph_capture"] = {"status": "failed", "error": traceback.format_exc()[-800:]}
    finally:
        dist.destroy_process_group()
    hs = report["host_stalls"]
    print(f"MoE layers x {a.layers}, {a.tokens} tokens, dim {a.dim}, {a.experts} experts of width "
          f"{a.expert_hidden}, top-{a.top_k}, {a.dtype}, device {report['device']}")
    for name, v in hs.items():
        print(f"  {name:9s}: step {v['step_ms']:.2f} ms, queued by the host in "
              f"{v['queue_ms']:.2f} ms, {v['host_reads']} host reads taking "
              f"{v['host_read_ms']:.2f} ms")
    gc = report["graph_capture"]
    print(f"  CUDA graph of one MoE layer: {json.dumps(gc)[:400]}")
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
