"""FP8 against bf16 for one MoE layer at the Mixtral, OLMoE and Qwen3-30B-A3B shapes: speed,
memory and error of each FP8 recipe the device runs (docs/fp8.md, "The GPU check").

    python scripts/bench_fp8.py                                  (on a GPU: the three shapes)
    python scripts/bench_fp8.py --shapes olmoe --json out.json
    python scripts/bench_fp8.py --shape 64,128,8,2,256 --dtype fp32 --device cpu --iters 2 --warmup 1

moetrain's MoE layer (router, dispatch, SwiGLU experts, combine) with the routed experts'
grouped GEMMs in high precision (`high`: the --dtype, bf16 by default) and through each FP8
recipe's grouped GEMM (moetrain/fp8/grouped.py: `rowwise` - also the experts of
train.fp8=tensorwise -, and `mxfp8`), same weights and inputs. A recipe the device cannot run is listed with the one-line reason
(moetrain.fp8.resolve_fp8); on the CPU every recipe runs emulated (slow: for testing this
script). Per variant: forward+backward milliseconds (median of two rounds, CUDA events),
TFLOP/s of the layer's expert GEMMs (18 * tokens * k * d * f per fwd+bwd), speed-up over the
high-precision layer, activation and peak bytes (CUDA), and the whole-tensor relative error of
the output and every gradient against an fp32 computation of the same layer (FP8's rounding:
a few %). Exit status 1 when a variant's error is not finite or over --max-error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import asdict
from typing import Optional

import torch

from bench_moe_layer import (
    TENSORS, build_moetrain, forward_backward, memory_of, moetrain_params, random_weights,
    rel_error, time_forward_backward,
)
from benchlib import DTYPES, device_name, median, moe_shapes, pick_device
from moetrain.config import ConfigError
from moetrain.config.schema import TrainConfig
from moetrain.fp8 import FP8Plan, resolve_fp8
from moetrain.fp8.grouped import grouped_gemm

# The routed experts of tensorwise and rowwise are the same grouped GEMM (FP8 rowwise).
RECIPES = ("rowwise", "mxfp8")
HIGH = "high"  # the variant without FP8, in --dtype


def plans(device: torch.device) -> dict[str, FP8Plan | str]:
    """recipe -> the plan this device runs, or why it cannot."""
    out: dict[str, FP8Plan | str] = {}
    for recipe in RECIPES:
        try:
            out[recipe] = resolve_fp8(TrainConfig(fp8=recipe), device)
        except ConfigError as err:
            out[recipe] = str(err)
    return out


def build(shape, weights, dtype, plan: Optional[FP8Plan]):
    layer = build_moetrain(shape, weights, dtype)
    if plan is not None:
        layer.experts.use_gemm(grouped_gemm(plan))
    return layer


def errors(shape, weights, x, grad, dtype, plan) -> dict[str, float]:
    """Whole-tensor rel. error of out and every gradient against the fp32 layer."""
    ref_layer = build(shape, weights, torch.float32, None)
    ref = forward_backward(ref_layer, moetrain_params(ref_layer), x.float(), grad.float())
    del ref_layer
    layer = build(shape, weights, dtype, plan)
    got = forward_backward(layer, moetrain_params(layer), x, grad)
    return {name: rel_error(t, r)[0] for name, t, r in zip(TENSORS, got, ref)}


def bench_shape(shape, device, dtype, seed, iters, warmup, variants) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {n: w.to(dtype).float() for n, w in random_weights(shape, device, gen).items()}
    x = torch.randn(shape.tokens, shape.d, device=device, generator=gen).to(dtype)
    grad = torch.randn(shape.tokens, shape.d, device=device, generator=gen).to(dtype)
    result: dict[str, dict] = {}
    times: dict[str, list[list[float]]] = {}
    for name, plan in variants.items():
        if isinstance(plan, str):
            result[name] = {"refused": plan}
    runnable = {n: p for n, p in variants.items() if not isinstance(p, str)}
    for _round in range(2):  # interleaved rounds: drift shows as spread, not as a speed-up
        for name, plan in runnable.items():
            layer = build(shape, weights, dtype, plan)
            params = moetrain_params(layer)
            x_leaf = x.detach().requires_grad_(True)
            times.setdefault(name, []).append(time_forward_backward(layer, params, x_leaf, grad,
                                                                    device, iters, warmup))
            if name not in result:
                act, peak = memory_of(layer, x_leaf, grad, device)
                result[name] = {"act_bytes": act, "peak_bytes": peak}
            del layer, params, x_leaf
    for name, rounds in times.items():
        ms = median([t for r in rounds for t in r])
        result[name].update(ms=ms, spread=abs(median(rounds[0]) - median(rounds[1])) / ms,
                            tflops=shape.flops / (ms * 1e-3) / 1e12,
                            err=errors(shape, weights, x, grad, dtype, runnable[name]))
    base = result[HIGH].get("ms")
    for name, r in result.items():
        if "ms" in r and base:
            r["speedup"] = base / r["ms"]
    return {"shape": asdict(shape), "variants": result}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="comma list of mixtral, olmoe, qwen3")
    p.add_argument("--shape", action="append", default=[], help="d,f,E,k,tokens (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="the high-precision layer's dtype (and the FP8 layers' inputs)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-error", type=float, default=0.15,
                   help="largest whole-tensor rel. error of a variant against fp32")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        print("error: --iters must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    variants: dict[str, FP8Plan | str | None] = {HIGH: None, **plans(device)}
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
              "iters": args.iters,
              "warmup": args.warmup, "shapes": []}
    print(f"device: {report['device']}; torch {report['torch']}; {report['date']}")
    for recipe, plan in variants.items():
        if isinstance(plan, str):
            print(f"{recipe}: not run here: {plan}")
    print("\n| shape | variant | fwd+bwd ms | TFLOP/s | speed-up | act MiB | peak MiB | "
          "worst rel. error vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    failed = False
    for shape in moe_shapes(args.shapes, args.shape):
        entry = bench_shape(shape, device, dtype, args.seed, args.iters, args.warmup, variants)
        report["shapes"].append(entry)
        for name, r in entry["variants"].items():
            if "refused" in r:
                continue
            worst = max(r["err"].values())
            failed |= not (math.isfinite(worst) and worst <= args.max_error)
            mib = lambda n: "n/a" if n is None else f"{n / 2**20:.0f}"  # noqa: E731
            print(f"| {shape.name} | {name} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                  f"{r.get('speedup', float('nan')):.2f}x | {mib(r['act_bytes'])} | "
                  f"{mib(r['peak_bytes'])} | {worst:.3g} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if failed:
        print(f"error: a variant's error is not finite or over --max-error {args.max_error}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
