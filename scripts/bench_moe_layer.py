"""Benchmark moetrain's MoE layer against an independent baseline: agreement, speed, memory.

    python scripts/bench_moe_layer.py                                  (the three issue shapes)
    python scripts/bench_moe_layer.py --shapes olmoe,qwen3 --json out.json
    python scripts/bench_moe_layer.py --shape 64,128,8,2,256 --dtype fp32 --device cpu

A shape is d,f,E,k,tokens (model dim, expert hidden width, experts, experts per token, tokens).
The baseline is written here, independently of moetrain; the implementations (baseline,
moetrain's MoELayer, and `triton`: the layer with model.moe.kernels=triton, where Triton runs
compiled with `--triton auto`, also through the interpreter with `on`) get the same weights and
inputs, are compared with an fp32 computation (a failed check exits with status 1 after the
table) and timed fwd+bwd. The implementations, the tolerances, the timing, the FLOP count and
the memory columns: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchlib import (
    DTYPES, device_name, matmul_ceiling, median, moe_shapes, pick_device, synchronize,
    time_iterations,
)
from benchlib import MOE_SHAPES as SHAPES
from benchlib import MoEShape as Shape
from benchlib import parse_moe_shape as parse_shape  # noqa: F401  (bench.parse_shape)
from moetrain import kernels
from moetrain.config.schema import LBLConfig, MoEConfig
from moetrain.model.moe import MoELayer


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # whole tensor
SLICE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # worst row / expert
TENSORS = ("out", "grad_x", "grad_router", "grad_w1", "grad_w3", "grad_w2")


# -- the baseline ---------------------------------------------------------------------------------

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm(x_ND: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return _torch_grouped_mm(x_ND, w_EIO, offs=offsets_E)


def loop_gemm(x_ND: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    parts = [x_nD @ w_EIO[e] for e, x_nD in enumerate(torch.split(x_ND, counts_E.tolist()))]
    return torch.cat(parts) if parts else x_ND.new_zeros(0, w_EIO.shape[-1])


def pick_gemm(device: torch.device, dtype: torch.dtype) -> Callable:
    """torch's grouped GEMM where it runs forward and backward for this device and dtype."""
    if _torch_grouped_mm is None:
        return loop_gemm
    try:
        x = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        counts = torch.tensor([10, 22], device=device)
        grouped_gemm(x, w, counts).square().sum().backward()
        return grouped_gemm
    except (RuntimeError, NotImplementedError, TypeError):
        return loop_gemm


class BaselineMoE(nn.Module):
    """Dropless top-k MoE with SwiGLU experts; the straightforward PyTorch formulation."""

    def __init__(self, d: int, f: int, experts: int, top_k: int, norm_topk_prob: bool,
                 gemm: Callable):
        super().__init__()
        self.router = nn.Parameter(torch.empty(experts, d))
        self.w1 = nn.Parameter(torch.empty(experts, d, f))
        self.w3 = nn.Parameter(torch.empty(experts, d, f))
        self.w2 = nn.Parameter(torch.empty(experts, f, d))
        self.top_k, self.norm_topk_prob, self.gemm = top_k, norm_topk_prob, gemm

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        E, k = self.router.shape[0], self.top_k
        probs_TE = torch.softmax(x_TD.float() @ self.router.float().t(), dim=-1)
        weight_TK, expert_TK = torch.topk(probs_TE, k, dim=-1)
        if self.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        expert_A = expert_TK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)  # assignments grouped by expert
        token_A = torch.div(order_A, k, rounding_mode="floor")
        counts_E = torch.bincount(expert_A, minlength=E)
        x_AD = x_TD.index_select(0, token_A)
        h_AF = F.silu(self.gemm(x_AD, self.w1, counts_E)) * self.gemm(x_AD, self.w3, counts_E)
        y_AD = self.gemm(h_AF, self.w2, counts_E)
        y_AD = y_AD * weight_TK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD)


# -- building both with the same weights --------------------------------------------------------


def random_weights(shape: Shape, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fp32 weights scaled so that logits and expert outputs are O(1) for unit-variance inputs."""
    E, d, f = shape.experts, shape.d, shape.f

    def normal(*size, std):
        return torch.randn(*size, device=device, generator=gen) * std

    return {"router": normal(E, d, std=d ** -0.5), "w1": normal(E, d, f, std=d ** -0.5),
            "w3": normal(E, d, f, std=d ** -0.5), "w2": normal(E, f, d, std=f ** -0.5)}


def build_baseline(shape: Shape, weights, dtype, gemm) -> BaselineMoE:
    layer = BaselineMoE(shape.d, shape.f, shape.experts, shape.top_k, shape.norm_topk_prob, gemm)
    layer.to(device=weights["w1"].device, dtype=dtype)
    with torch.no_grad():
        for name, w in weights.items():
            getattr(layer, name).copy_(w)
    return layer


def build_moetrain(shape: Shape, weights, dtype, perturb: float = 0.0) -> MoELayer:
    cfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, expert_hidden=shape.f,
                    norm_topk_prob=shape.norm_topk_prob, capacity_factor=None,
                    lbl=LBLConfig(coeff=0.0), z_loss_coeff=0.0)
    layer = MoELayer(shape.d, cfg).to(device=weights["w1"].device, dtype=dtype)
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        for name in ("w1", "w3", "w2"):
            getattr(layer.experts, name).copy_(weights[name])
        if perturb:  # for testing the check: a wrong expert must be caught
            layer.experts.w2[0].mul_(1.0 + perturb)
    return layer


def build_triton(shape: Shape, weights, dtype, perturb: float = 0.0) -> MoELayer:
    """moetrain's layer with model.moe.kernels=triton (permute, combine and SwiGLU kernels)."""
    layer = build_moetrain(shape, weights, dtype, perturb)
    layer.dispatcher.kernels = layer.experts.kernels = "triton"
    return layer


def triton_wanted(mode: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to run the triton implementation: `--triton auto|on|off` (module docstring)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if mode == "off":
        return False
    if mode == "on":
        if not kernels.triton_usable(probe):
            raise SystemExit(f"error: --triton on: the Triton kernels cannot run on {device.type} "
                             f"{dtype} here (needs CUDA, or TRITON_INTERPRET=1 on the CPU)")
        return True
    return device.type == "cuda" and kernels.triton_usable(probe) and not kernels.interpreter_enabled()


def moetrain_params(layer: MoELayer) -> list[torch.Tensor]:
    return [layer.router.weight, layer.experts.w1, layer.experts.w3, layer.experts.w2]


def baseline_params(layer: BaselineMoE) -> list[torch.Tensor]:
    return [layer.router, layer.w1, layer.w3, layer.w2]


def time_forward_backward(layer: nn.Module, params: list, x_leaf: torch.Tensor,
                          grad: torch.Tensor, device: torch.device, iters: int,
                          warmup: int) -> list[float]:
    """`time_iterations` of one forward + backward of `layer` on `x_leaf` (ms per iteration),
    the input's and `params`' gradients cleared before each."""
    def step():
        run_layer(layer, x_leaf).backward(grad)

    def zero():
        x_leaf.grad = None
        for p in params:
            p.grad = None

    return time_iterations(step, device, iters, warmup, before=zero)


def run_layer(layer: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, MoELayer):
        return layer(x_TD.unsqueeze(0)).squeeze(0)
    return layer(x_TD)


def forward_backward(layer, params, x_TD, grad_TD) -> list[torch.Tensor]:
    """[out, grad_x, grad_router, grad_w1, grad_w3, grad_w2] of one fwd+bwd (detached)."""
    x = x_TD.detach().requires_grad_(True)
    for p in params:
        p.grad = None
    out = run_layer(layer, x)
    out.backward(grad_TD)
    return [out.detach(), x.grad] + [p.grad for p in params]


# -- agreement ----------------------------------------------------------------------------------


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(whole-tensor, worst slice along dim 0) relative error in Frobenius norms."""
    diff = (a.float() - ref.float()).flatten(1)
    ref2 = ref.float().flatten(1)
    whole = torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref2)
    diff_S = torch.linalg.vector_norm(diff, dim=1)
    ref_S = torch.linalg.vector_norm(ref2, dim=1)
    # A slice that is zero in the reference (an expert without tokens) must be zero here too.
    per_slice = torch.where(ref_S > 0, diff_S / ref_S.clamp_min(1e-30),
                            torch.where(diff_S > 0, math.inf, 0.0))
    return whole.nan_to_num(math.inf).item(), per_slice.max().item()


@dataclass
class Agreement:
    ok: bool
    err: dict[str, dict[str, float]]  # implementation -> tensor -> whole-tensor rel. error vs fp32
    slice_err: dict[str, dict[str, float]]  # likewise, worst slice
    problems: list[str] = field(default_factory=list)


BUILDERS = {"moetrain": (build_moetrain, moetrain_params), "triton": (build_triton, moetrain_params)}


def check_agreement(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int,
                    perturb: float = 0.0, tol: Optional[float] = None,
                    slice_tol: Optional[float] = None,
                    impls: tuple[str, ...] = ("baseline", "moetrain")) -> Agreement:
    """Compare each implementation in `dtype` with the fp32 computation (module docstring);
    `impls` starts with the baseline, the others are held to it."""
    tol = TOLERANCE[dtype] if tol is None else tol
    slice_tol = SLICE_TOLERANCE[dtype] if slice_tol is None else slice_tol
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = random_weights(shape, device, gen)
    x32 = torch.randn(shape.tokens, shape.d, device=device, generator=gen)
    g32 = torch.randn(shape.tokens, shape.d, device=device, generator=gen)
    # The reference sees the same (rounded) values as the low-precision runs.
    weights = {n: w.to(dtype).float() for n, w in weights.items()}
    x32, g32 = x32.to(dtype).float(), g32.to(dtype).float()

    ref_layer = build_baseline(shape, weights, torch.float32, pick_gemm(device, torch.float32))
    ref = forward_backward(ref_layer, baseline_params(ref_layer), x32, g32)
    del ref_layer
    gemm = pick_gemm(device, dtype)
    problems = []
    errs = {impl: {} for impl in impls}
    slice_errs = {impl: {} for impl in impls}
    for impl in impls:
        if impl == "baseline":
            layer = build_baseline(shape, weights, dtype, gemm)
            params = baseline_params(layer)
        else:
            build, get_params = BUILDERS[impl]
            layer = build(shape, weights, dtype, perturb)
            params = get_params(layer)
        got = forward_backward(layer, params, x32.to(dtype), g32.to(dtype))
        del layer, params
        for name, t, r in zip(TENSORS, got, ref):
            if t is None or t.shape != r.shape:
                problems.append(f"{impl} {name}: missing or shape {None if t is None else tuple(t.shape)}")
                errs[impl][name] = slice_errs[impl][name] = math.inf
                continue
            if not torch.isfinite(t).all():
                problems.append(f"{impl} {name}: not finite")
            if not t.any():
                problems.append(f"{impl} {name}: all zeros")
            errs[impl][name], slice_errs[impl][name] = rel_error(t, r)
        del got
    for impl in impls[1:]:
        for name in TENSORS:
            m, b = errs[impl][name], errs["baseline"][name]
            if not m <= max(tol, 1.5 * b):
                problems.append(f"{impl} {name}: rel. error {m:.2e} > max(tol {tol:.0e}, "
                                f"1.5 x baseline {b:.2e})")
            m, b = slice_errs[impl][name], slice_errs["baseline"][name]
            if not m <= max(slice_tol, 2.0 * b):
                problems.append(f"{impl} {name}: worst-slice rel. error {m:.2e} > max(tol "
                                f"{slice_tol:.0e}, 2 x baseline {b:.2e})")
    return Agreement(not problems, errs, slice_errs, problems)


# -- timing and memory ----------------------------------------------------------------------------


@dataclass
class Timing:
    ms: float
    spread: float  # |median round 1 - median round 2| / ms
    act_bytes: Optional[int]
    peak_bytes: Optional[int]


def measure(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int, iters: int,
            warmup: int, impls: tuple[str, ...] = ("baseline", "moetrain")) -> dict[str, Timing]:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    weights = random_weights(shape, device, gen)
    x = torch.randn(shape.tokens, shape.d, device=device, generator=gen).to(dtype)
    grad = torch.randn(shape.tokens, shape.d, device=device, generator=gen).to(dtype)
    del gen
    layers = {
        "baseline": (lambda: build_baseline(shape, weights, dtype, pick_gemm(device, dtype)), baseline_params),
    }
    for impl in impls[1:]:
        build, get_params = BUILDERS[impl]
        layers[impl] = (lambda build=build: build(shape, weights, dtype), get_params)
    times: dict[str, list[list[float]]] = {impl: [] for impl in layers}
    memory: dict[str, tuple[Optional[int], Optional[int]]] = {}
    for _round in range(2):
        for impl, (build, get_params) in layers.items():
            layer = build()  # one implementation's weights on the device at a time
            params = get_params(layer)
            x_leaf = x.detach().requires_grad_(True)
            times[impl].append(time_forward_backward(layer, params, x_leaf, grad, device,
                                                     iters, warmup))
            if impl not in memory:
                memory[impl] = memory_of(layer, x_leaf, grad, device)
            del layer, params, x_leaf
    out = {}
    for impl, rounds in times.items():
        ms = median([t for r in rounds for t in r])
        spread = abs(median(rounds[0]) - median(rounds[1])) / ms
        out[impl] = Timing(ms, spread, *memory[impl])
    return out


def memory_of(layer: nn.Module, x_leaf: torch.Tensor, grad: torch.Tensor,
              device: torch.device) -> tuple[Optional[int], Optional[int]]:
    """(bytes the forward leaves for backward, peak bytes during fwd+bwd), CUDA only; both above
    a base of weights, their gradients (allocated by a first step and kept) and the input."""
    if device.type != "cuda":
        return None, None
    run_layer(layer, x_leaf).backward(grad)
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run_layer(layer, x_leaf)
    act = torch.cuda.memory_allocated(device) - base
    out.backward(grad)
    del out
    synchronize(device)
    return act, torch.cuda.max_memory_allocated(device) - base


# -- report ---------------------------------------------------------------------------------------


def mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--shape", action="append", default=[], help="d,f,E,k,tokens (repeatable)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=None, help="default: fresh from os.urandom")
    p.add_argument("--tol", type=float, default=None, help="override the whole-tensor tolerance")
    p.add_argument("--slice-tol", type=float, default=None, help="override the worst-slice tolerance")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="testing only: scale moetrain's (and triton's) expert 0 w2 by 1+PERTURB "
                        "(check must fail)")
    p.add_argument("--skip-timing", action="store_true", help="agreement check only")
    p.add_argument("--triton", choices=("auto", "on", "off"), default="auto",
                   help="the triton implementation: auto = where Triton runs compiled (CUDA)")
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)

    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    shapes = moe_shapes(args.shapes, args.shape)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    ceiling = None if args.skip_timing else matmul_ceiling(device, dtype)
    header = (f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}; "
              f"seed {seed}; date {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(header)
    if ceiling is not None:
        print(f"matmul ceiling ({args.dtype}): {ceiling:.4g} TFLOP/s")

    impls = ("baseline", "moetrain") + (("triton",) if triton_wanted(args.triton, device, dtype) else ())
    print(f"implementations: {', '.join(impls)}")
    out_json = {"header": header, "device": device_name(device), "torch": torch.__version__,
                "triton": triton_version(), "dtype": args.dtype, "seed": seed,
                "ceiling_tflops": ceiling, "impls": list(impls), "shapes": []}
    rows, failed = [], False
    for shape in shapes:
        agree = check_agreement(shape, device, dtype, seed, args.perturb, args.tol, args.slice_tol,
                                impls)
        failed |= not agree.ok
        for line in agree.problems:
            print(f"FAIL {shape.name}: {line}")
        timing = (None if args.skip_timing
                  else measure(shape, device, dtype, seed, args.iters, args.warmup, impls))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        entry = {"shape": asdict(shape), "flops": shape.flops, "agree": agree.ok,
                 "problems": agree.problems}
        for impl in impls:
            entry[f"{impl}_err"] = agree.err[impl]
            entry[f"{impl}_slice_err"] = agree.slice_err[impl]
            impl_ok = not any(line.startswith(f"{impl} ") for line in agree.problems)
            cells = [shape.name, shape.tokens, shape.d, shape.f, shape.experts, shape.top_k, impl]
            if timing is None:
                cells += ["-"] * 8
            else:
                t, base = timing[impl], timing["baseline"]
                tflops = shape.flops / (t.ms * 1e-3) / 1e12
                act_ratio = (f"{t.act_bytes / base.act_bytes:.2f}"
                             if t.act_bytes and base.act_bytes else "n/a")
                cells += [f"{t.ms:.4g}", f"{tflops:.4g}", f"{100 * tflops / ceiling:.3g}",
                          f"{100 * t.spread:.1f}%", mib(t.act_bytes), mib(t.peak_bytes),
                          f"{base.ms / t.ms:.2f}", act_ratio]
                entry[impl] = {**asdict(t), "tflops": tflops, "pct_ceiling": 100 * tflops / ceiling}
            cells += [f"{max(agree.err[impl].values()):.1e}",
                      "ref" if impl == "baseline" else ("ok" if impl_ok else "FAIL")]
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        out_json["shapes"].append(entry)
        if args.json:  # after every shape: a later shape that fails or hangs keeps these
            with open(args.json, "w") as fh:
                json.dump(out_json, fh, indent=2)

    print()
    print("| shape | T | d | f | E | k | impl | ms | TFLOP/s | % ceil | spread | act MiB | peak MiB "
          "| speed vs base | act vs base | max rel err | check |")
    print("|" + "---|" * 17)
    print("\n".join(rows))
    if failed:
        print("agreement check FAILED", file=sys.stderr)
        return 1
    print("\nagreement check passed")
    return 0


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
