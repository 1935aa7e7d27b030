"""scripts/bench_dispatcher.py and scripts/bench_checkpoint.py at tiny sizes: the dispatcher's in a
subprocess (it forks its ranks), the checkpoint bench's main() in this process with one intra-op
thread (a subprocess repeats the import of torch, and two threads per process thrash a loaded
2-core machine: 54 s instead of 8; its command line is run by tests/test_readme.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run_script(*args, timeout=60):
    # one intra-op thread: on a loaded 2-core machine a pool of 2 per process thrashes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_dispatcher_bench_times_every_exchange_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPTS / "bench_dispatcher.py", "--ranks", "2", "--tokens", "64",
                      "--dim", "32", "--expert-hidden", "16", "--experts", "4",
                      "--shared-hidden", "16", "--iters", "2", "--warmup", "1", "--json", out,
                      timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert [r[1] for r in rows] == ["exact", "exact+overlap", "sync-free", "sync-free+overlap"]
    # the exact exchange reads its split sizes once per forward, the sync-free one never
    assert [r[4] for r in rows] == ["1", "1", "0", "0"]
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3] == "1.00x"
    assert "load average" in proc.stdout and "% of the exact step" in proc.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["ranks"] == 2 and 0 < result["exchange_share"]
    for name, v in result["variants"].items():
        assert v["overflowed"] is False  # a budget of ep covers any routing
        if name.startswith("sync-free"):
            # slots of budget x balanced rows per peer: some padding, never negative
            assert 0 <= v["wasted_rows_frac"] < 1 and 0 < v["need"] <= 2.0
        else:
            assert v["wasted_rows_frac"] is None
    assert all(len(t) == 2 for r in result["per_rank"] for t in r["times"].values())


def test_dispatcher_bench_refuses_bad_arguments():
    proc = run_script(SCRIPTS / "bench_dispatcher.py", "--ranks", "3", "--experts", "4")
    assert proc.returncode == 2 and "--ranks 3" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_bench_runs_all_three_modes(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_checkpoint",
                                                  SCRIPTS / "bench_checkpoint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ckpt.json"
    # a smaller model than tiny's (2 layers of width 64, 32-token sequences): the script's
    # loop and its three modes are under test, not the model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_script's OMP_NUM_THREADS=1: 2 threads thrash a busy machine
    try:
        assert bench.main(["train.global_batch_size=2", "train.micro_batch_size=2",
                           "model.n_layers=2", "model.d_model=64", "model.ffn_hidden=128",
                           "model.moe.expert_hidden=64", "data.seq_len=32", "--steps", "3",
                           "--save-every", "1", "--warmup", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    modes = [line.split("|")[1].strip() for line in stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| mode")]
    assert modes == ["none", "sync", "async"]
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["saves"] == 0 and results["none"]["save_block_ms_mean"] == 0
    assert results["sync"]["saves"] == 2 and results["async"]["saves"] == 2
    assert all(r["steps"] == 2 and r["step_ms_mean"] > 0 for r in results.values())
    assert results["sync"]["save_block_ms_mean"] > 0
