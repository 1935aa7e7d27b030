"""Benchmark moetrain.kernels: each Triton kernel against the PyTorch path, fwd+bwd, at MoE shapes.

    python scripts/bench_kernels.py                                   (mixtral, olmoe, qwen3; bf16)
    python scripts/bench_kernels.py --shapes olmoe --dtype fp32 --json kernels.json
    python scripts/bench_kernels.py --shape 64,128,8,2,256 --device cpu      (PyTorch only)
    python scripts/bench_kernels.py --merge kernels.json      (into moetrain/kernels/speed_record.json)

A shape is d,f,E,k,tokens as in bench_moe_layer.py. Per shape, a dropless top-k routing of
random softmax scores (the dispatcher's stable sort by expert) and random activations:

  permute    x [T, d] -> rows [T k, d]          torch: index_select (the dispatcher's gather)
  unpermute  rows [T k, d], w [T, k] -> y [T, d]  torch: moetrain.kernels.reference, and
                                                 dispatcher: TokenDispatcher.unpermute
  swiglu     a, b [T k, f] -> h [T k, f]        torch: F.silu(a) * b

Each is timed fwd+bwd (random output gradient; input gradients dropped before each iteration,
outside the timed region): `--warmup` untimed, then `--iters` timed iterations between CUDA
events, in two rounds; the median. GB/s counts the fewest bytes fwd+bwd must move (each input
read once, each output written once; unpermute's backward reads its gradient row once per
assignment): permute (3 N + T) d, unpermute (4 N + T) d, swiglu 8 N f element sizes, N = T k.
`act MiB` (CUDA) is what the forward leaves allocated for backward, output included.
Agreement: the Triton output and input gradients against the same computation in fp32 on the
same rounded values, relative Frobenius error <= 1e-5 (fp32) / 1e-2 (bf16).

The JSON's `entries` are in the format of moetrain/kernels/speed_record.json (torch_ms = the
fastest PyTorch implementation); `--merge FILE...` copies the agreeing, compiled (not
interpreted) entries of such files (or of a gpu_check JSON) into that record, replacing entries
of the same op, GPU model, dtype and shape. `model.moe.kernels=auto` reads the record.
Triton runs on CUDA; on the CPU only with TRITON_INTERPRET=1 (interpreted: not timed usefully,
never merged).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from moetrain import kernels
from benchlib import (
    DTYPES, MOE_SHAPES, MoEShape, device_name, median, moe_shapes, pick_device, synchronize,
    time_iterations,
)
from moetrain.kernels import reference
from moetrain.kernels.select import (
    SPEED_RECORD, auto_choice, device_model, dtype_name, load_speed_record,
)
from moetrain.model.moe.dispatcher import TokenDispatcher
from moetrain.model.moe.router import RouterOutput

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def make_inputs(shape: MoEShape, device: torch.device, dtype: torch.dtype, gen: torch.Generator):
    T, k, E, d, f = shape.tokens, shape.top_k, shape.experts, shape.d, shape.f
    scores_TE = torch.softmax(torch.randn(T, E, device=device, generator=gen), dim=-1)
    weight_TK, idx_TK = scores_TE.topk(k, dim=-1)
    routing = RouterOutput(scores_TE, scores_TE, weight_TK, idx_TK)
    dispatcher = TokenDispatcher(E, kernels="torch")
    _, _, handle = dispatcher.permute(torch.empty(T, 0, device=device), routing)
    row_map = handle.row_map
    N = row_map.num_rows

    def randn(*size):
        return torch.randn(*size, device=device, generator=gen).to(dtype)

    return {"row_map": row_map, "handle": handle, "dispatcher": dispatcher, "weight_TK": weight_TK,
            "x": randn(T, d), "rows": randn(N, d), "y_grad": randn(T, d), "rows_grad": randn(N, d),
            "a": randn(N, f) * 2, "b": randn(N, f), "h_grad": randn(N, f)}


def op_cases(inp) -> dict[str, tuple[dict[str, Callable], list[str], str, int]]:
    """op -> ({implementation: fn(*leaves) -> out}, input names (leaves), output-grad name, bytes)."""
    row_map, handle, dispatcher = inp["row_map"], inp["handle"], inp["dispatcher"]
    T, d = inp["x"].shape
    N, f = inp["a"].shape
    size = inp["x"].element_size()

    def dispatcher_unpermute(rows, w):
        return dispatcher.unpermute(rows, type(handle)(handle.row_map, w))

    return {
        "permute": ({"torch": lambda x: reference.permute(x, row_map),
                     "triton": lambda x: kernels.permute(x, row_map, "triton")},
                    ["x"], "rows_grad", (3 * N + T) * d * size),
        "unpermute": ({"torch": lambda r, w: reference.unpermute(r, w, row_map),
                       "dispatcher": dispatcher_unpermute,
                       "triton": lambda r, w: kernels.unpermute(r, w, row_map, "triton")},
                      ["rows", "weight_TK"], "y_grad", (4 * N + T) * d * size),
        "swiglu": ({"torch": reference.swiglu,
                    "triton": lambda a, b: kernels.swiglu(a, b, "triton")},
                   ["a", "b"], "h_grad", 8 * N * f * size),
    }


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    num = torch.linalg.vector_norm(a.float() - ref.float())
    den = torch.linalg.vector_norm(ref.float())
    return float(num / den) if float(den) > 0 else float(num)


def run_once(fn, leaves, grad):
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def agreement(fn, inputs: list[torch.Tensor], grad: torch.Tensor, ref_fn) -> dict[str, float]:
    """Relative errors of fn's output and input gradients against ref_fn in fp32."""
    got = run_once(fn, [t.detach().requires_grad_(True) for t in inputs], grad)
    ref = run_once(ref_fn, [t.detach().float().requires_grad_(True) for t in inputs], grad.float())
    names = ["out"] + [f"grad{i}" for i in range(len(inputs))]
    return {n: rel_error(g, r) for n, g, r in zip(names, got, ref)}


def activation_bytes(fn, leaves, device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*leaves)
    act = torch.cuda.memory_allocated(device) - base
    del out
    return act


def bench_shape(shape: MoEShape, device: torch.device, dtype: torch.dtype, seed: int,
                iters: int, warmup: int, with_triton: bool) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    inp = make_inputs(shape, device, dtype, gen)
    gpu, dname = device_model(device), dtype_name(dtype)
    entries = []
    for op, (impls, names, grad_name, nbytes) in op_cases(inp).items():
        if not with_triton:
            impls = {n: fn for n, fn in impls.items() if n != "triton"}
        inputs = [inp[n] for n in names]
        grad = inp[grad_name]
        ms, act, problems, errors = {}, {}, [], {}
        if "triton" in impls:
            errors = agreement(impls["triton"], inputs, grad, impls["torch"])
            tol = TOLERANCE[dtype]
            problems = [f"{op} triton {n}: rel. error {e:.2e} > {tol:.0e}"
                        for n, e in errors.items() if not e <= tol]
        rounds: dict[str, list[float]] = {n: [] for n in impls}
        for _round in range(2):
            for name, fn in impls.items():
                leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

                def step(fn=fn, leaves=leaves):
                    fn(*leaves).backward(grad)

                def zero(leaves=leaves):
                    for t in leaves:
                        t.grad = None

                rounds[name] += time_iterations(step, device, iters, warmup, before=zero)
                if name not in act:
                    act[name] = activation_bytes(fn, leaves, device)
        ms = {n: median(t) for n, t in rounds.items()}
        torch_ms = min(v for n, v in ms.items() if n != "triton")
        entries.append({
            "op": op, "device": gpu, "dtype": dname,
            "shape": {"name": shape.name, "d": shape.d, "f": shape.f, "experts": shape.experts,
                      "top_k": shape.top_k, "tokens": shape.tokens},
            "torch_ms": torch_ms, "triton_ms": ms.get("triton"), "impl_ms": ms,
            "min_bytes": nbytes, "gbps": {n: nbytes / (v * 1e-3) / 1e9 for n, v in ms.items()},
            "act_bytes": act, "rel_err": errors, "ok": not problems, "problems": problems,
            "interpreted": device.type != "cuda", "torch": torch.__version__,
            "triton": triton_version(), "date": datetime.date.today().isoformat(),
        })
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entries


# -- the record -----------------------------------------------------------------------------------


def entries_of(path: Path) -> list[dict]:
    """Benchmark entries of a bench_kernels JSON, or of a gpu_check JSON that ran it."""
    with open(path) as fh:
        data = json.load(fh)
    if "entries" in data:
        return data["entries"]
    step = data.get("steps", {}).get("bench_kernels", {})
    result = step.get("result") or {}
    if "entries" in result:
        return result["entries"]
    raise SystemExit(f"error: {path}: no benchmark entries (neither 'entries' nor "
                     f"steps.bench_kernels.result.entries)")


def merge(paths: list[Path], record_path: Path = SPEED_RECORD) -> int:
    """Copy the agreeing, compiled entries of `paths` into the speed record; returns how many.
    Every input is read before the record is touched; the record is replaced atomically."""
    key = lambda e: (e["op"], e["device"], e["dtype"], e["shape"]["name"])  # noqa: E731
    new = [e for path in paths for e in entries_of(path)]
    load_speed_record(record_path)  # validates
    with open(record_path) as fh:
        record = json.load(fh)
    merged = {key(e): e for e in record["entries"]}
    added = 0
    for e in new:
        if not e.get("ok") or e.get("interpreted") or not e.get("triton_ms") or e["device"] == "cpu":
            print(f"skipped (failed, interpreted or not on a GPU): {key(e)}")
            continue
        merged[key(e)] = {k: e[k] for k in ("op", "device", "dtype", "shape", "torch_ms",
                                             "triton_ms", "impl_ms", "torch", "triton", "date")}
        added += 1
    record["entries"] = [merged[k] for k in sorted(merged)]
    tmp = record_path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    tmp.replace(record_path)
    for op, gpu, dname in sorted({k[:3] for k in merged}):
        pick = auto_choice(op, gpu, dname, record["entries"])
        ratio = kernels.recorded_speedup(op, gpu, dname, record["entries"])
        print(f"auto on {gpu} {dname}: {op} -> {pick} (worst recorded speedup {ratio:.2f})")
    return added


# -- command line ---------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="comma list of " + ", ".join(MOE_SHAPES))
    p.add_argument("--shape", action="append", default=[], help="d,f,E,k,tokens (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help=f"merge measured entries into {SPEED_RECORD.name} and exit")
    args = p.parse_args(argv)
    if args.merge:
        missing = [m for m in args.merge if not Path(m).is_file()]
        if missing:
            raise SystemExit(f"error: --merge: no such file: {', '.join(missing)}")
        print(f"merged {merge([Path(m) for m in args.merge])} entries into {SPEED_RECORD}")
        return 0
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("error: --iters must be >= 1 and --warmup >= 0")

    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    shapes = moe_shapes(args.shapes, args.shape)
    with_triton = kernels.triton_usable(torch.empty(0, device=device, dtype=dtype))
    header = (f"device: {device_name(device)}; torch {torch.__version__}; triton "
              f"{triton_version()}; dtype {args.dtype}; seed {args.seed}; "
              f"date {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(header)
    if not with_triton:
        print("Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on the CPU): PyTorch only")
    elif device.type != "cuda":
        print("Triton runs through its interpreter: its times are not GPU times")
    out = {"header": header, "device": device_name(device), "torch": torch.__version__,
           "triton": triton_version(), "dtype": args.dtype, "entries": []}
    for shape in shapes:
        out["entries"] += bench_shape(shape, device, dtype, args.seed, args.iters, args.warmup,
                                      with_triton)
        if args.json:  # after every shape: a later one that fails keeps these
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)

    print()
    print("| shape | op | impl | ms | GB/s | act MiB | speed vs torch | max rel err | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for e in out["entries"]:
        for impl, ms in e["impl_ms"].items():
            act = e["act_bytes"].get(impl)
            check = "-" if impl != "triton" else ("ok" if e["ok"] else "FAIL")
            err = f"{max(e['rel_err'].values()):.1e}" if impl == "triton" else "-"
            print(f"| {e['shape']['name']} | {e['op']} | {impl} | {ms:.4g} | {e['gbps'][impl]:.4g} | "
                  f"{'n/a' if act is None else f'{act / 2**20:.0f}'} | {e['torch_ms'] / ms:.2f} | "
                  f"{err} | {check} |")
        for line in e["problems"]:
            print(f"FAIL {e['shape']['name']}: {line}")
        failed |= not e["ok"]
    if failed:
        print("agreement check FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
