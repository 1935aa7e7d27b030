"""scripts/bench_prepare.py at a tiny size: it generates its corpus, trains its tokenizer and
measures every worker count on the same tokens."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_prepare_runs_and_reports(tmp_path):
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_prepare.py"), "--size-mb", "1", "--workers", "1", "2",
         "--vocab-size", "500", "--sample-mb", "1", "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["workers"] for r in rows] == [1, 2]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 200_000  # ~1 MB of text
    assert all(r["tokens_per_s"] > 0 and 50 < r["peak_pss_mib"] <= r["peak_rss_mib"] and r["memory_samples"] > 0
               and r["cpu_s"] > 0 for r in rows)
    assert proc.stdout.count("| 1 MB | sentencepiece 500 |") == 2
    work = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert work == ["corpus-1mb", "spm500.model"], "the prepared directories are removed"
    corpus = (tmp_path / "work" / "corpus-1mb")
    assert 1_000_000 <= sum(f.stat().st_size for f in corpus.glob("*.jsonl")) < 1_200_000
