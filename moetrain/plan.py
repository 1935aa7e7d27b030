"""Size a config before running it: parameters, FLOPs, memory per rank; with a GPU, whether each
stage fits, the bytes each step moves and a step-time estimate; a dry run of the real build; a
search over layouts.

    python -m moetrain.plan +experiment=mixtral_8x7b
    python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 parallel.tp=2 --world-size 64
    python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 --world-size 8 --gpu h100
    python -m moetrain.plan +experiment=qwen3_30b_a3b --world-size 16 --gpu h100 --search
    python -m moetrain.plan +experiment=tiny parallel.tp=2 --world-size 8 --dry-run
    python -m moetrain.plan +experiment=olmoe_1b_7b --json

Overrides are Hydra's, as for `moetrain.train`. The world size defaults to the smallest one the
layout allows (lcm of tp*cp*pp and etp*ep*pp). An invalid config, layout or flag prints
`error: ...` (naming the key or flag) on stderr and exits with status 2; a dry run whose built
model differs from the planner exits with status 1. Formulas: moetrain/planning.py,
plan_shards.py, plan_comm.py, step_time.py; docs/planning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.plan",
        description="Parameters, FLOPs per token and memory per rank of a config; with --gpu "
                    "whether it fits, its communication and step time (nothing runs).",
    )
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks W (default: the smallest the layout allows)")
    parser.add_argument("--gpu", default=None, help="h100 | h200 | b200 | gb200: memory fit, "
                        "communication by node and a step-time estimate")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU (default: the --gpu's)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs of one NVLink domain (default: the --gpu's; 8, gb200 72)")
    parser.add_argument("--search", action="store_true",
                        help="rank the layouts of --world-size that fit --gpu by step time")
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the real model of every role under a fake process group "
                             "and check it against the planner")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. +experiment=mixtral_8x7b parallel.ep=8")
    args = parser.parse_intermixed_args(argv)

    from moetrain.config import ConfigError, LoggingConfig, compose, to_object, validate
    from moetrain.hardware import HardwareError, hardware
    from moetrain.parallel import LayoutError, check_layout
    from moetrain.planning import format_plan, make_plan, min_world_size

    try:
        gpu = _gpu(args, hardware)
        cfg = to_object(compose(list(args.overrides)))
    except (ConfigError, HardwareError) as err:
        return _refuse(err)
    if args.search and (gpu is None or args.world_size is None):
        return _refuse("--search needs --gpu and --world-size")
    if args.top < 1:
        return _refuse(f"--top must be a positive integer, got {args.top}")
    world_size = args.world_size or min_world_size(cfg.parallel)
    try:
        # Logging checks whether wandb/tensorboard are installed here, which a plan made on a
        # laptop for a GPU cluster must not depend on: validate everything else.
        validate(dataclasses.replace(cfg, logging=LoggingConfig()))
        if args.search:
            return _search(cfg, world_size, gpu, args)
        dims = check_layout(cfg, world_size)
    except (LayoutError, ConfigError) as err:
        return _refuse(err)
    plan = make_plan(cfg, dims)
    extra = _hardware_report(cfg, dims, plan, gpu) if gpu is not None else None
    if args.json:
        out = plan.to_dict()
        if extra is not None:
            out.update(extra[1])
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
        if extra is not None:
            print()
            print(extra[0])
    if args.dry_run:
        from moetrain.dryrun import dry_run, format_dry_run

        run = dry_run(cfg, dims)
        print(file=sys.stderr if args.json else sys.stdout)
        print(format_dry_run(run), file=sys.stderr if args.json else sys.stdout)
        if not run.ok:
            return 1
    return 0


def _refuse(err: Any) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _gpu(args, hardware):
    from moetrain.hardware import HardwareError, check_gpus_per_node

    if args.gpu is None:
        if args.gpu_memory is not None:
            raise HardwareError("--gpu-memory needs --gpu (h100, h200, b200, gb200)")
        if args.gpus_per_node is not None:
            check_gpus_per_node(args.gpus_per_node)
            raise HardwareError("--gpus-per-node needs --gpu (h100, h200, b200, gb200)")
        return None
    return hardware(args.gpu, args.gpu_memory, args.gpus_per_node)


def _search(cfg, world_size: int, gpu, args) -> int:
    from moetrain.layout_search import format_search, search_layouts
    from moetrain.parallel.dims import ParallelDims

    ParallelDims(world_size)  # a positive world size, or LayoutError
    results, checked = search_layouts(cfg, world_size, gpu)
    if args.json:
        print(json.dumps([{"overrides": c.overrides, "step_s": c.estimate.step_s,
                           "tokens_per_s_per_gpu": c.estimate.tokens_per_s_per_gpu,
                           "mfu": c.estimate.mfu, "peak_memory_bytes": c.peak.total}
                          for c in results[:args.top]], indent=2))
    else:
        print(format_search(cfg, world_size, gpu, results, checked, args.top))
    return 0


def _hardware_report(cfg, dims, plan, gpu) -> tuple[str, dict]:
    """Fit per stage, communication by group and the step-time estimate, as text and JSON."""
    from moetrain.layout_search import RESERVED_GIB, headroom, search_layouts, usable_bytes
    from moetrain.plan_comm import step_collectives
    from moetrain.planning import gib, human
    from moetrain.step_time import (
        LATENCY_S, LINK_EFFICIENCY, MATMUL_EFFICIENCY, collective_seconds, estimate_step,
        nodes_spanned,
    )

    lines = [f"on {gpu.name}: {gpu.peak_tflops:g} TFLOP/s dense bf16, {gpu.memory_gib:g} GiB "
             f"({RESERVED_GIB:g} reserved: {gib(usable_bytes(gpu))} usable), NVLink "
             f"{gpu.nvlink_gb_s:g} GB/s, network {gpu.network_gb_s:g} GB/s per GPU, "
             f"{gpu.gpus_per_node} GPUs per node; world {dims.world_size} = "
             f"{-(-dims.world_size // gpu.gpus_per_node)} node(s)"]
    fits = []
    for m in plan.memory:
        room = headroom(m, gpu)
        fits.append({"stage": m.stage, "fits": room >= 0, "headroom_bytes": room})
        verdict = (f"fits, {gib(room)} headroom" if room >= 0 else
                   f"does NOT fit: {gib(m.total)} + {RESERVED_GIB:g} GiB reserved > "
                   f"{gpu.memory_gib:g} GiB")
        lines.append(f"  stage {m.stage}: {gib(m.total)} at its peak, {verdict}")
    report: dict = {"gpu": dataclasses.asdict(gpu), "fit": fits}
    if not all(f["fits"] for f in fits):
        found, _ = search_layouts(cfg, dims.world_size, gpu)
        if found:
            lines.append(f"  layouts of {dims.world_size} ranks that fit (fastest first; "
                         f"--search for more):")
            lines += [f"    {c.label}   ({gib(c.peak.total)}, "
                      f"{c.estimate.tokens_per_s_per_gpu:,.0f} tokens/s/GPU)" for c in found[:3]]
        else:
            lines.append(f"  no layout of {dims.world_size} ranks fits a {gpu.name}: more GPUs, "
                         "a shorter data.seq_len or a smaller train.micro_batch_size")
        report["fitting_layouts"] = [c.overrides for c in found[:3]]

    est = estimate_step(cfg, dims, gpu)
    slow = est.slowest
    calls = step_collectives(cfg, dims, slow.rank)
    lines += ["", f"communication of one step on rank {slow.rank} (stage {slow.stage}, the slowest):",
              f"  {'group':<10}{'ranks':>6}{'nodes':>7}{'calls':>9}{'bytes':>12}{'seconds':>10}"
              "  issued by"]
    by_group: dict[str, list] = {}
    for c in calls:
        g = by_group.setdefault(c.group, [c.size, nodes_spanned(c.ranks, gpu.gpus_per_node), 0,
                                          0, 0.0, set()])
        g[2] += c.count
        g[3] += c.total_bytes
        g[4] += collective_seconds(c, gpu, slow.rank) * c.count
        g[5].add(c.what)
    for group, (size, nodes, n, b, t, whats) in sorted(by_group.items(), key=lambda kv: -kv[1][3]):
        where = "" if size == 1 else ("  (within a node)" if nodes == 1 else
                                      f"  (crosses {nodes} nodes)")
        lines.append(f"  {group:<10}{size:>6}{nodes:>7}{n:>9}{gib(b):>12}{t:>9.3f}s  "
                     f"{', '.join(sorted(whats))}{where}")
    lines += ["", "step time (model; docs/planning.md \"Step time\"):",
              f"  compute {slow.compute_s:.2f}s at {MATMUL_EFFICIENCY:.0%} of peak + exposed "
              f"communication {slow.exposed_comm_s:.2f}s + FSDP {slow.fsdp_s:.2f}s (hidden "
              f"behind compute, {max(0.0, slow.fsdp_s - slow.compute_s):.2f}s exposed) + pipeline "
              f"bubble {est.bubble_s:.2f}s + optimizer {est.optimizer_s:.2f}s",
              f"  step {est.step_s:.2f}s, {est.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
              f"{est.model_tflops_per_gpu:.0f} model TFLOP/s/GPU ({human(plan.flops.train, 'FLOP')}"
              f"/token), MFU {est.mfu:.1%}",
              f"  (assumes: links at {LINK_EFFICIENCY:.0%} of their bandwidth + "
              f"{LATENCY_S * 1e6:.0f} us per call; tensor/context/expert-parallel and pipeline "
              "communication not overlapped with compute, FSDP's overlapped; balanced routing)"]
    report["step_time"] = {
        "step_s": est.step_s, "tokens_per_s_per_gpu": est.tokens_per_s_per_gpu,
        "model_tflops_per_gpu": est.model_tflops_per_gpu, "mfu": est.mfu,
        "bubble_s": est.bubble_s, "optimizer_s": est.optimizer_s,
        "stages": [dataclasses.asdict(s) for s in est.stages],
    }
    report["communication"] = {
        "rank": slow.rank,
        "calls": [{"op": c.op, "group": c.group, "size": c.size, "bytes": c.bytes,
                   "count": c.count, "what": c.what,
                   "nodes": nodes_spanned(c.ranks, gpu.gpus_per_node)} for c in calls],
    }
    return "\n".join(lines), report


if __name__ == "__main__":
    sys.exit(main())
