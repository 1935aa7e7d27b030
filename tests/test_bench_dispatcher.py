"""scripts/bench_dispatcher.py and scripts/bench_checkpoint.py at tiny sizes (subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run_script(*args, timeout=60):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_dispatcher_bench_two_ranks_prints_the_table_and_counts_bytes(tmp_path):
    out = tmp_path / "bench.json"
    dim = 16
    proc = run_script(SCRIPTS / "bench_dispatcher.py", "--ranks", "2", "--tokens", "64",
                      "--dim", dim, "--experts", "4", "--top-k", "2", "--iters", "2",
                      "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == 8 and float(cells[-1]) > 0 and float(cells[-2]) > 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["ranks"] == 2
    sent_total = recv_total = 0
    for r in result["per_rank"]:
        assert r["element_size"] == 4  # fp32
        assert r["bytes_sent"] == r["rows_sent"] * dim * 4
        assert r["bytes_recv"] == r["rows_recv"] * dim * 4
        assert r["rows_sent"] == 64 * 2  # dropless: every token's k assignments leave permute
        sent_total += r["rows_sent"]
        recv_total += r["rows_recv"]
    assert sent_total == recv_total
    # rank i's split to rank j is what rank j received from rank i
    p0, p1 = result["per_rank"]
    assert p0["send_splits"][1] == p1["recv_splits"][0] and p1["send_splits"][0] == p0["recv_splits"][1]
    assert cells[1] == f"{result['rows_sent_mean']:.0f}"


def test_checkpoint_bench_runs_all_three_modes(tmp_path):
    out = tmp_path / "ckpt.json"
    proc = run_script(SCRIPTS / "bench_checkpoint.py", "train.global_batch_size=2",
                      "train.micro_batch_size=2", "--steps", "4", "--save-every", "2",
                      "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modes = [line.split("|")[1].strip() for line in proc.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| mode")]
    assert modes == ["none", "sync", "async"]
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert results["none"]["saves"] == 0 and results["none"]["save_block_ms_mean"] == 0
    assert results["sync"]["saves"] == 2 and results["async"]["saves"] == 2
    assert all(r["steps"] == 3 and r["step_ms_mean"] > 0 for r in results.values())
    assert results["sync"]["save_block_ms_mean"] > 0
