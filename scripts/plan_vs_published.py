"""The step-time model against published end-to-end training throughput of other frameworks.

    python scripts/plan_vs_published.py            # the table of docs/planning.md ("Step time")
    python scripts/plan_vs_published.py --json

Each row is a published measurement (framework, model, GPUs, layout, precision, tokens/s/GPU,
source) and moetrain's step-time model for the same model, GPUs, batch and layout
(`moetrain.step_time.estimate_step`). The model's one fitted constant, MATMUL_EFFICIENCY, is
calibrated on the row marked `calibrate` (the efficiency that reproduces it exactly, rounded to
two digits, is what moetrain/step_time.py holds: `--check` fails otherwise); the other rows are
predictions and their errors are what they are. The layouts are mapped onto moetrain's config:
FSDP where the row used FSDP (NeMo AutoModel), replicated data parallelism where it used DDP with
a distributed optimizer (Megatron), pipeline layers split as evenly as the stages allow.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AUTOMODEL = ("NeMo AutoModel docs/performance-summary.md (pre-training, DGX-H100, BF16; "
             "github.com/NVIDIA-NeMo/Automodel, commit 01926a5c, updated 2025-10-02)")
BRIDGE = ("Megatron-Bridge docs/performance-summary.md, 25.11 NeMo container "
          "(github.com/NVIDIA-NeMo/Megatron-Bridge, commit 00b7660b)")


@dataclass
class Row:
    framework: str
    experiment: str
    gpu: str
    gpus: int
    layout: dict  # tp, pp, vpp, ep, cp
    gbs: int
    mbs: int
    fsdp: bool
    published: float  # tokens/s/GPU
    source: str
    calibrate: bool = False
    gpus_per_node: int | None = None  # NVLink domain as the run placed its ranks (None: table's)


ROWS = [
    Row("NeMo AutoModel (FSDP2 + EP, TE, DeepEP)", "qwen3_30b_a3b", "h100", 8,
        dict(ep=8), 512, 4, True, 12040, AUTOMODEL, calibrate=True),
    Row("NeMo AutoModel (FSDP2 + EP, TE, DeepEP)", "deepseek_v3", "h100", 256,
        dict(pp=4, vpp=8, ep=64), 512, 1, True, 1002, AUTOMODEL),
    Row("NeMo AutoModel (FSDP2 + EP, TE, DeepEP)", "deepseek_v3", "h100", 1024,
        dict(pp=4, vpp=8, ep=64), 8192, 1, True, 865, AUTOMODEL),
    Row("NeMo AutoModel (FSDP2 + EP, TE, DeepEP)", "kimi_k2", "h100", 256,
        dict(pp=8, vpp=4, ep=32), 512, 1, True, 924, AUTOMODEL),
    Row("Megatron-Bridge (Megatron-Core, DDP + distributed optimizer)", "deepseek_v3", "gb200",
        256, dict(pp=4, vpp=4, ep=64), 4096, 1, False, 3139, BRIDGE, gpus_per_node=64),
    Row("Megatron-Bridge (Megatron-Core, DDP + distributed optimizer)", "qwen3_235b_a22b",
        "gb200", 256, dict(pp=8, vpp=3, ep=32), 8192, 1, False, 4916, BRIDGE, gpus_per_node=64),
]


def overrides(row: Row) -> list[str]:
    from moetrain.config import compose, to_object
    from moetrain.layout_search import balanced_pp_layers

    lay = row.layout
    out = [f"+experiment={row.experiment}", f"train.global_batch_size={row.gbs}",
           f"train.micro_batch_size={row.mbs}", f"parallel.fsdp.enabled={str(row.fsdp).lower()}"]
    out += [f"parallel.{k}={v}" for k, v in lay.items()]
    pp, vpp = lay.get("pp", 1), lay.get("vpp", 1)
    if vpp > 1:
        out.append("parallel.pp_schedule=interleaved")
    if pp * vpp > 1:
        n_layers = to_object(compose([f"+experiment={row.experiment}"])).model.n_layers
        split = balanced_pp_layers(n_layers, pp * vpp)
        if split is not None:
            out.append("parallel.pp_layers=[" + ",".join(map(str, split)) + "]")
    return out


_CONFIGS: dict = {}


def predict(row: Row, efficiency: float | None = None, gpus_per_node: int | None = None) -> dict:
    from moetrain import step_time
    from moetrain.config import compose, to_object
    from moetrain.hardware import hardware
    from moetrain.parallel import check_layout
    from moetrain.planning import memory_per_rank

    key = tuple(overrides(row))
    if key not in _CONFIGS:  # composing is the slow part; calibration predicts one row often
        _CONFIGS[key] = to_object(compose(list(key)))
    cfg = _CONFIGS[key]
    dims = check_layout(cfg, row.gpus)
    saved = step_time.MATMUL_EFFICIENCY
    if efficiency is not None:
        step_time.MATMUL_EFFICIENCY = efficiency
    try:
        gpu = hardware(row.gpu, gpus_per_node=gpus_per_node or row.gpus_per_node)
        est = step_time.estimate_step(cfg, dims, gpu)
    finally:
        step_time.MATMUL_EFFICIENCY = saved
    peak = max(m.total for m in memory_per_rank(cfg, dims)) / 2**30
    return {"tokens_per_s_per_gpu": est.tokens_per_s_per_gpu, "mfu": est.mfu,
            "tflops": est.model_tflops_per_gpu, "step_s": est.step_s, "peak_gib": peak,
            "fits": peak + 3.0 <= gpu.memory_gib}


def hardware_default(gpu: str) -> int:
    from moetrain.hardware import GPUS

    return GPUS[gpu].gpus_per_node


def calibrate(row: Row) -> float:
    """The MATMUL_EFFICIENCY at which the model reproduces `row` (bisection)."""
    lo, hi = 0.05, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if predict(row, mid)["tokens_per_s_per_gpu"] < row.published:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless step_time.MATMUL_EFFICIENCY is the calibrated value")
    args = parser.parse_args(argv)
    from moetrain import step_time

    (cal,) = [r for r in ROWS if r.calibrate]
    fitted = calibrate(cal)
    rows = []
    for r in ROWS:
        p = predict(r)
        if r.gpus_per_node is not None:  # the same with the table's domain (ranks packed 72 per rack)
            packed = predict(r, gpus_per_node=hardware_default(r.gpu))
            p["packed_tokens_per_s_per_gpu"] = packed["tokens_per_s_per_gpu"]
        rows.append({"framework": r.framework, "experiment": r.experiment, "gpu": r.gpu,
                     "gpus": r.gpus, "layout": r.layout, "gbs": r.gbs, "mbs": r.mbs,
                     "fsdp": r.fsdp, "published": r.published, "source": r.source,
                     "calibration": r.calibrate, **p,
                     "ratio": p["tokens_per_s_per_gpu"] / r.published})
    if args.json:
        print(json.dumps({"fitted_efficiency": fitted,
                          "efficiency": step_time.MATMUL_EFFICIENCY, "rows": rows}, indent=2))
    else:
        print(f"MATMUL_EFFICIENCY fitted on {cal.experiment} x{cal.gpus} {cal.gpu}: {fitted:.4f} "
              f"(moetrain/step_time.py holds {step_time.MATMUL_EFFICIENCY})")
        print("| framework | model | GPUs | layout | GBS x MBS | published tok/s/GPU | "
              "predicted tok/s/GPU | predicted / published | moetrain peak memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            lay = " ".join(f"{k.upper()}{v}" for k, v in r["layout"].items())
            lay += " FSDP" if r["fsdp"] else " DDP"
            if "packed_tokens_per_s_per_gpu" in r:
                lay += f", {ROWS[rows.index(r)].gpus_per_node} GPUs per NVLink domain"
            mark = " (calibration)" if r["calibration"] else ""
            fits = "fits" if r["fits"] else "does not fit"
            packed = ""
            if "packed_tokens_per_s_per_gpu" in r:
                packed = (f" ({r['packed_tokens_per_s_per_gpu']:,.0f} = "
                          f"{r['packed_tokens_per_s_per_gpu'] / r['published']:.2f} with "
                          f"{hardware_default(r['gpu'])} per domain)")
            print(f"| {r['framework']} | {r['experiment']} | {r['gpus']} x {r['gpu']} | {lay} | "
                  f"{r['gbs']} x {r['mbs']} | {r['published']:,.0f} | "
                  f"{r['tokens_per_s_per_gpu']:,.0f} | {r['ratio']:.2f}{mark}{packed} | "
                  f"{r['peak_gib']:.0f} GiB, {fits} |")
    if args.check and round(fitted, 2) != step_time.MATMUL_EFFICIENCY:
        print(f"step_time.MATMUL_EFFICIENCY = {step_time.MATMUL_EFFICIENCY}, calibrated "
              f"{fitted:.2f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
