"""How long the planner takes: the frontier dry runs at 256 / 1,024 / 2,048 ranks and a layout
search, each as the command a user types (a fresh process, imports included).

    python scripts/bench_plan.py [--cases dry search] [--json OUT] [--worlds 256 1024 2048]

Every case is `python -m moetrain.plan ...` in a subprocess; it reports wall seconds, the CPU
seconds of that process (user + system: the machine's cores are shared with anything else
running, so the 1-minute `load` average before each case is printed too), its peak resident
set, and the command's verdict (a dry run exits 1 when the built model differs from the
planner). The layouts are the frontier runs' own where published (DeepSeek-V3: PP16 x EP64 on
2,048 GPUs; Kimi K2: PP16 with virtual stages x EP16), pipeline layers split as evenly as the
stages allow. Results: docs/planning.md ("Speed of the planner").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# experiment -> world size -> layout overrides (pipeline layers added by `_layers`)
DRY_RUNS: dict[str, dict[int, list[str]]] = {
    "deepseek_v3": {
        256: ["parallel.pp=8", "parallel.ep=32"],
        1024: ["parallel.pp=16", "parallel.ep=64"],
        2048: ["parallel.pp=16", "parallel.ep=64"],
    },
    "kimi_k2": {
        256: ["parallel.pp=8", "parallel.ep=32"],
        1024: ["parallel.pp=16", "parallel.ep=16"],
        2048: ["parallel.pp=16", "parallel.vpp=2", "parallel.pp_schedule=interleaved",
               "parallel.ep=16"],
    },
    "qwen3_235b_a22b": {
        256: ["parallel.tp=2", "parallel.pp=8", "parallel.ep=32"],
        1024: ["parallel.tp=2", "parallel.pp=8", "parallel.ep=32"],
        2048: ["parallel.tp=4", "parallel.pp=8", "parallel.ep=64"],
    },
}
SEARCHES = [("qwen3_30b_a3b", 16, "h100")]


def _layers(experiment: str, overrides: list[str]) -> list[str]:
    from moetrain.config import compose, to_object
    from moetrain.layout_search import balanced_pp_layers

    cfg = to_object(compose([f"+experiment={experiment}", *overrides]))
    stages = cfg.parallel.pp * cfg.parallel.vpp
    split = balanced_pp_layers(cfg.model.n_layers, stages) if stages > 1 else None
    return [] if split is None else ["parallel.pp_layers=[" + ",".join(map(str, split)) + "]"]


def _run(args: list[str]) -> dict:
    import tempfile

    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "moetrain.plan", *args], cwd=REPO,
                                stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own CPU time and peak RSS
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    last = stdout.strip().splitlines()[-1] if stdout.strip() else stderr.strip()[-200:]
    return {"command": "python -m moetrain.plan " + " ".join(args), "returncode": proc.returncode,
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load": round(load, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "last_line": last}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["dry", "search"], choices=["dry", "search"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--experiments", nargs="+", default=list(DRY_RUNS))
    parser.add_argument("--json", default=None, help="append one JSON line per case to this file")
    args = parser.parse_args(argv)
    machine = {"date": date.today().isoformat(), "machine": platform.node(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    import torch

    machine["torch"] = torch.__version__
    print(f"# {machine}")
    print(f"{'case':<44}{'ranks':>6}{'wall s':>8}{'CPU s':>7}{'load':>6}{'RSS MiB':>9}  verdict")
    rows = []
    if "dry" in args.cases:
        for exp in args.experiments:
            for world in args.worlds:
                layout = DRY_RUNS[exp][world]
                over = [f"+experiment={exp}", *layout, *_layers(exp, layout)]
                row = _run([*over, "--world-size", str(world), "--dry-run"])
                row.update(case=f"dry run {exp} {' '.join(layout)}", world=world, **machine)
                rows.append(row)
                print(f"{row['case']:<44}{world:>6}{row['wall_s']:>8}{row['cpu_s']:>7}"
                      f"{row['load']:>6}{row['peak_rss_mib']:>9}  rc={row['returncode']} "
                      f"{row['last_line'][:60]}", flush=True)
    if "search" in args.cases:
        for exp, world, gpu in SEARCHES:
            row = _run([f"+experiment={exp}", "--world-size", str(world), "--gpu", gpu,
                        "--search", "--top", "5"])
            row.update(case=f"search {exp} on {world} x {gpu}", world=world, **machine)
            rows.append(row)
            print(f"{row['case']:<44}{world:>6}{row['wall_s']:>8}{row['cpu_s']:>7}"
                  f"{row['load']:>6}{row['peak_rss_mib']:>9}  rc={row['returncode']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
