"""What building a real-shape model costs each rank: peak memory after init, parameter bytes,
seconds.

    python scripts/bench_init.py [--experiments olmoe_1b_7b qwen3_30b_a3b] [--layers 2]
                                 [--ranks 1 2 4 8] [--layouts ep fsdp] [--json OUT]
                                 [overrides...]

For each experiment (full width, `model.n_layers` = --layers) and each world size W, W gloo
ranks forked from this process (torch imported, nothing built) run the trainer's own
the trainer's model build (meta device, `parallelize`, `init_parameters`) on the CPU: meta-device construction, the layout applied on meta,
each rank's shards allocated and initialised. Layouts: `ep` = parallel.ep=W (experts split by
EP, everything else by FSDP over dp = W), `fsdp` = FSDP2 over dp = W (experts included); both
shard every parameter W ways. One process runs once ("single").

Per rank it reports the resident set before building (the baseline: the interpreter, torch and
the process group), the peak resident set while building (VmHWM after resetting it), the
parameter bytes it holds, and the build's wall seconds and CPU seconds, the latter per billion
local parameters (so its linearity in the local size shows; CPU time, because the ranks share
the machine's cores with each other and anything else running: the `load` column is the
1-minute load average before the row). Each rank uses one thread. Checks, printed per row:
peak <= 1.25 x parameter bytes + baseline; and for W > 1, (peak - baseline) within 1.25 / W of
the single process's (every layout here shards everything W ways).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.fsdp  # noqa: E402,F401 - imported before forking, not by every rank
import torch.distributed.tensor  # noqa: E402,F401

from moetrain import memory  # noqa: E402
from moetrain.config import compose, to_object  # noqa: E402
from moetrain.parallel import ParallelDims, check_layout  # noqa: E402
from moetrain.model import Transformer  # noqa: E402
from moetrain.model.init import init_parameters  # noqa: E402
from moetrain.parallel.parallelize import BatchShape, parallelize  # noqa: E402
from moetrain.parallel.rank import RankLayout  # noqa: E402

CPU = torch.device("cpu")
PEAK_FACTOR = 1.25


def config(experiment: str, layers: int, layout: str, world: int, extra: list[str]):
    overrides = [f"+experiment={experiment}", f"model.n_layers={layers}", "train.device=cpu",
                 *extra]
    if layout == "ep" and world > 1:
        overrides.append(f"parallel.ep={world}")
    cfg = to_object(compose(overrides))
    check_layout(cfg, world)
    return cfg


def _rank(rank: int, world: int, port: int, cfg, results) -> None:
    try:
        torch.set_num_threads(1)
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world,
                                    timeout=timedelta(minutes=30))
        dims = ParallelDims.from_config(cfg.parallel, world)
        rank_layout = RankLayout.create(dims, CPU)
        t = cfg.train
        batch = BatchShape(t.micro_batch_size, t.global_batch_size // (t.micro_batch_size * dims.dp),
                           cfg.data.seq_len)
        baseline = memory.current_bytes(CPU)
        memory.reset_peak(CPU)
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.device("meta"):  # as the trainer builds it
            model = Transformer(cfg.model)
        model, _ = parallelize(model, rank_layout, cfg.parallel, batch)
        init_parameters(model, cfg.model, t.seed)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak = memory.peak_bytes(CPU)
        params = memory.parameter_bytes(model)
        n_local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                      for p in model.parameters())
        results.put((rank, dict(baseline=baseline, peak=peak, params=params, n_local=n_local,
                                seconds=seconds, cpu_seconds=cpu_seconds)))
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, {"error": traceback.format_exc()}))


def run(cfg, world: int) -> list[dict]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, cfg, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = dict(results.get() for _ in range(world))
    for p in procs:
        p.join()
    errors = [v["error"] for v in out.values() if "error" in v]
    if errors:
        raise RuntimeError(errors[0])
    return [out[r] for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="+", default=["olmoe_1b_7b", "qwen3_30b_a3b"])
    ap.add_argument("--layers", type=int, default=2, help="model.n_layers (full width)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--layouts", nargs="+", default=["ep", "fsdp"], choices=["ep", "fsdp"])
    ap.add_argument("--json", type=Path, help="append one JSON line per row")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. model.vocab_size=1024)")
    args = ap.parse_args(argv)

    print("| experiment | layout | ranks | load | baseline GiB | peak GiB (max rank) | params GiB "
          "(per rank) | peak <= 1.25 x params + baseline | (peak - baseline) x ranks / single | "
          "build s (wall) | CPU s per B local params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for experiment in args.experiments:
        single = None
        for world in args.ranks:
            for layout in (args.layouts if world > 1 else ["single"]):
                cfg = config(experiment, args.layers, layout, world, args.overrides)
                load = os.getloadavg()[0]
                ranks = run(cfg, world)
                worst = max(ranks, key=lambda r: r["peak"])
                within = all(r["peak"] <= PEAK_FACTOR * r["params"] + r["baseline"] for r in ranks)
                grown = max(r["peak"] - r["baseline"] for r in ranks)
                if world == 1:
                    single = grown
                ratio = grown * world / single if single else float("nan")
                eighth = world == 1 or ratio <= PEAK_FACTOR
                ok &= within and eighth
                seconds = max(r["seconds"] for r in ranks)
                per_billion = max(r["cpu_seconds"] / (r["n_local"] / 1e9) for r in ranks)
                g = memory.GIB
                print(f"| {experiment} | {layout} | {world} | {load:.1f} | "
                      f"{worst['baseline'] / g:.2f} | {worst['peak'] / g:.2f} | "
                      f"{worst['params'] / g:.2f} | {'ok' if within else 'FAIL'} | "
                      f"{ratio:.2f}{'' if eighth else ' FAIL'} | {seconds:.1f} | {per_billion:.1f} |",
                      flush=True)
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(dict(experiment=experiment, layout=layout, world=world,
                                                layers=args.layers, load=load, ranks=ranks,
                                                overrides=args.overrides)) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
