"""Training throughput and MFU of a moetrain model on one device, from random tokens.

    python scripts/bench_train.py model.n_layers=4 --steps 20            (OLMoE-1B-7B-like, 4 layers)
    python scripts/bench_train.py +experiment=tiny data.seq_len=64 --steps 3 --warmup 1   (CPU)
    python scripts/bench_train.py model.n_layers=4 train.recompute=moe --json out.json
    python scripts/bench_train.py model.n_layers=4 --fp8 none,tensorwise,rowwise,te:tensorwise

Arguments without dashes are Hydra overrides, composed like `moetrain.train` does (default
experiment: `+experiment=olmoe_1b_7b`, used when no `+experiment=` is given). One optimizer
step per micro-batch of random tokens; tokens/s and MFU (moetrain.planning's training FLOPs per
token over a matmul ceiling measured in the same process) are defined in docs/performance.md,
which also says why the full OLMoE-1B-7B-like model does not fit one 80 GB GPU.

`--fp8 LIST` measures the same config once per FP8 variant in this one process, side by side
(docs/fp8.md, "The GPU check"): `none`, a recipe (`tensorwise`, `rowwise`, `mxfp8`; torchao) or
`te:RECIPE` (Transformer Engine for the dense linears); every variant starts from the same
initial weights and trains on the same batches, so "loss first -> last" compares them. A
variant the device cannot run is reported with its one-line reason (moetrain.fp8.resolve_fp8)
and the others still run; the JSON then holds {"variants": {name: result}}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from benchlib import device_name, matmul_ceiling, median, synchronize, time_iterations
from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.fp8 import apply_fp8, resolve_fp8
from moetrain.model import MoEControl, Transformer, set_recompute
from moetrain.optim import build_optimizer
from moetrain.parallel.compile import apply_compile
from moetrain.planning import count_parameters, flops_per_token
from moetrain.runtime import init_runtime

DEFAULT_EXPERIMENT = "+experiment=olmoe_1b_7b"


def measure(overrides: list[str], args) -> Optional[dict]:
    """Train `args.warmup + args.steps` steps of the config `overrides` on this device; the
    result dict, or None (after a message) when a loss was not finite. ConfigError for a config
    (or FP8 recipe) this device refuses."""
    cfg = to_object(compose(overrides))
    validate(cfg)
    rt = init_runtime(cfg)
    device = rt.device
    compute_dtype = rt.autocast_dtype or torch.float32
    fp8 = resolve_fp8(cfg.train, device)

    torch.manual_seed(cfg.train.seed)  # every variant of one invocation: the same initial weights
    with torch.device(device):  # initialise on the device (a GPU draws the weights much faster)
        model = Transformer(cfg.model)
    if fp8 is not None:
        apply_fp8(model, fp8)  # as parallelize does, first
    set_recompute(model, cfg.train.recompute)
    if cfg.train.compile:
        apply_compile(model)  # as the trainer: every block, regionally
    optimizer = build_optimizer(model, cfg.optim)
    B, S, V = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    batches = [torch.randint(0, V, (B, S + 1), device=device, generator=gen) for _ in range(4)]
    losses: list[torch.Tensor] = []
    step_no = [0]
    moe = MoEControl(model, cfg.model.moe,
                     num_moe_layers=cfg.model.n_layers - cfg.model.moe.first_dense_layers,
                     micro_batches_per_step=1)

    def train_step() -> None:
        tokens = batches[step_no[0] % len(batches)]
        moe.start_step(step_no[0])
        step_no[0] += 1
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        losses.append(loss.detach())

    ceiling = matmul_ceiling(device, compute_dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_iterations(train_step, device, args.steps, args.warmup)
    synchronize(device)
    loss_values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in loss_values):
        print(f"error: non-finite loss {loss_values}", file=sys.stderr)
        return None

    params = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, S)
    flops_causal = flops_per_token(cfg.model, S, causal=True)
    step_ms = median(times)
    tokens_per_s = B * S / (step_ms * 1e-3)
    mfu = flops.train * tokens_per_s / (ceiling * 1e12)
    mfu_causal = flops_causal.train * tokens_per_s / (ceiling * 1e12)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__,
        "overrides": overrides, "dtype": str(compute_dtype).removeprefix("torch."),
        "fp8": None if fp8 is None else f"{fp8.backend}:{fp8.recipe}"
                                          + (" (emulated)" if fp8.emulate else ""),
        "recompute": cfg.train.recompute, "compile": cfg.train.compile, "micro_batch": B,
        "seq_len": S,
        "n_layers": cfg.model.n_layers, "params_total": params.n_total,
        "params_active": params.n_active, "train_flops_per_token": flops.train,
        "steps": args.steps, "warmup": args.warmup, "step_ms": step_ms,
        "tokens_per_s": tokens_per_s, "ceiling_tflops": ceiling,
        "model_tflops": flops.train * tokens_per_s / 1e12, "mfu": mfu, "mfu_causal": mfu_causal,
        "peak_memory_bytes": peak, "first_loss": loss_values[0], "last_loss": loss_values[-1],
        "_params": params,
    }


def report(result: dict) -> None:
    params = result.pop("_params")
    peak = result["peak_memory_bytes"]
    B, S = result["micro_batch"], result["seq_len"]
    print(f"device: {result['device']}; torch {result['torch']}; {result['date']}")
    print(f"config: {' '.join(result['overrides'])}")
    print(f"model: {params.n_total / 1e9:.3f}B params, {params.n_active / 1e9:.3f}B active; "
          f"{result['n_layers']} layers; recompute={result['recompute']}; dtype {result['dtype']}"
          f"; fp8 {result['fp8'] or 'none'}")
    print(f"matmul ceiling: {result['ceiling_tflops']:.4g} TFLOP/s; training FLOPs/token "
          f"{result['train_flops_per_token']:.4g}")
    print()
    print("| tokens/step | step ms | tokens/s | model TFLOP/s | MFU | MFU (causal attn) | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {B * S} | {result['step_ms']:.4g} | {result['tokens_per_s']:.4g} | "
          f"{result['model_tflops']:.4g} | {100 * result['mfu']:.3g}% | "
          f"{100 * result['mfu_causal']:.3g}% | "
          f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} | "
          f"{result['first_loss']:.3f} -> {result['last_loss']:.3f} |")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.n_layers=4")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--fp8", default=None,
                   help="comma list of FP8 variants to measure side by side: none, tensorwise, "
                        "rowwise, mxfp8, te:tensorwise, te:mxfp8 (module docstring)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")

    overrides = list(args.overrides)
    if not any(o.startswith("+experiment=") for o in overrides):
        overrides.insert(0, DEFAULT_EXPERIMENT)
    if not args.fp8:
        result = measure(overrides, args)
        if result is None:
            return 1
        report(result)
    else:
        result = {"variants": {}}
        for variant in args.fp8.split(","):
            backend, _, recipe = variant.rpartition(":")
            extra = [f"train.fp8={recipe}"] + ([f"train.fp8_backend={backend}"] if backend else [])
            try:
                one = measure(overrides + extra, args)
            except ConfigError as err:
                print(f"\n{variant}: not run here: {err}")
                result["variants"][variant] = {"refused": str(err)}
                continue
            if one is None:
                return 1
            print(f"\n== {variant}")
            report(one)
            result["variants"][variant] = one
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
