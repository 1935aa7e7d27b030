"""scripts/bench_init.py at a reduced real shape (OLMoE's width with 16 experts and one layer):
the table, its checks and the per-rank numbers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_init_measures_each_rank_and_checks_the_peak(tmp_path):
    out = tmp_path / "init.jsonl"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_init.py", "--experiments", "olmoe_1b_7b", "--layers", "1",
         "--ranks", "1", "2", "--layouts", "ep", "--json", str(out),
         "model.vocab_size=1024", "model.moe.num_experts=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| olmoe_1b_7b")]
    assert [(r[1].strip(), r[2].strip(), r[7].strip()) for r in rows] == [
        ("single", "1", "ok"), ("ep", "2", "ok")]
    single, ep2 = [json.loads(line) for line in out.read_text().splitlines()]
    (one,) = single["ranks"]
    # 16 experts x 3 x 2048 x 1024 + attention 4 x 2048^2 + norms 2 x 2048 + OLMoE's q/k norms
    # over the whole projections 2 x 2048 + router 16 x 2048, + embedding and output
    # 2 x 1024 x 2048 + final norm, in fp32
    n = (16 * 3 * 2048 * 1024 + 4 * 2048**2 + 2 * 2048 + 2 * 2048 + 16 * 2048 + 2 * 1024 * 2048
         + 2048)
    assert one["params"] == 4 * n and one["n_local"] == n
    for rank in ep2["ranks"]:  # half of everything: experts by EP, the rest by FSDP
        assert rank["params"] == 2 * n
        assert rank["baseline"] < rank["peak"] <= 1.25 * rank["params"] + rank["baseline"]
        assert rank["cpu_seconds"] > 0
