"""scripts/bench_kernels.py on the CPU (Triton through its interpreter) and its record merge."""

import json
import shutil
import subprocess
import sys

import pytest

from moetrain.kernels.select import SPEED_RECORD, auto_choice, load_speed_record
from tests.test_bench_scripts import ROOT, SCRIPTS, load


@pytest.fixture(scope="module")
def bench():
    return load("bench_kernels")


def test_runs_checks_and_writes_record_entries(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_kernels.py"), "--shape", "32,48,6,2,40",
                           "--device", "cpu", "--iters", "1", "--warmup", "0", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Triton runs through its interpreter" in proc.stdout  # TRITON_INTERPRET=1 (conftest)
    entries = json.loads(out.read_text())["entries"]
    assert [e["op"] for e in entries] == ["permute", "unpermute", "swiglu"]
    for e in entries:
        assert e["ok"] and e["interpreted"] and e["device"] == "cpu" and e["dtype"] == "bf16"
        assert e["triton_ms"] > 0 and e["torch_ms"] == min(v for k, v in e["impl_ms"].items() if k != "triton")
        assert max(e["rel_err"].values()) < 1e-2 and e["shape"]["tokens"] == 40
    assert set(entries[1]["impl_ms"]) == {"torch", "dispatcher", "triton"}
    n, d = 40 * 2, 32  # unpermute moves at least (4 N + T) d elements
    assert entries[1]["min_bytes"] == (4 * n + 40) * d * 2
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 32,48,6,2,40 |")]
    assert len(rows) == 7 and all(r.split("|")[-2].strip() in ("ok", "-") for r in rows)


def test_a_wrong_kernel_fails_the_check(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench.kernels, "swiglu", lambda a, b, kernels: a * b)
    assert bench.main(["--shape", "32,48,6,2,40", "--device", "cpu", "--iters", "1",
                       "--warmup", "0", "--dtype", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "FAIL 32,48,6,2,40: swiglu triton out: rel. error" in out
    assert "FAIL 32,48,6,2,40: permute" not in out


def gpu_entry(op, torch_ms, triton_ms, shape="olmoe", **extra):
    return {"op": op, "device": "NVIDIA H200", "dtype": "bf16", "shape": {"name": shape},
            "torch_ms": torch_ms, "triton_ms": triton_ms, "impl_ms": {}, "torch": "2.11.0",
            "triton": "3.6.0", "date": "2026-12-01", "ok": True, "interpreted": False, **extra}


def test_merge_takes_only_agreeing_compiled_gpu_entries(bench, tmp_path, capsys):
    record = tmp_path / "speed_record.json"
    shutil.copy(SPEED_RECORD, record)
    check = {"steps": {"bench_kernels": {"result": {"entries": [
        gpu_entry("unpermute", 2.0, 0.5), gpu_entry("unpermute", 2.0, 1.0, shape="qwen3"),
        gpu_entry("swiglu", 1.0, 2.0),
        gpu_entry("permute", 1.0, 0.1, ok=False),  # failed agreement: never recorded
        gpu_entry("permute", 1.0, 0.1, interpreted=True, device="cpu"),
    ]}}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(check))
    assert bench.merge([path], record) == 3
    entries = load_speed_record(record)
    assert sorted((e["op"], e["shape"]["name"]) for e in entries) == [
        ("swiglu", "olmoe"), ("unpermute", "olmoe"), ("unpermute", "qwen3")]
    assert auto_choice("unpermute", "NVIDIA H200", "bf16", entries) == "triton"
    assert auto_choice("swiglu", "NVIDIA H200", "bf16", entries) == "torch"
    assert auto_choice("permute", "NVIDIA H200", "bf16", entries) == "torch"
    assert "unpermute -> triton (worst recorded speedup 2.00)" in capsys.readouterr().out
    # a later run replaces the same (op, GPU, dtype, shape)
    path.write_text(json.dumps({"entries": [gpu_entry("unpermute", 1.0, 4.0)]}))
    bench.merge([path], record)
    assert auto_choice("unpermute", "NVIDIA H200", "bf16", load_speed_record(record)) == "torch"
    assert len(load_speed_record(record)) == 3


def test_merge_refuses_missing_or_foreign_files(bench, tmp_path):
    with pytest.raises(SystemExit, match="--merge: no such file"):
        bench.main(["--merge", str(tmp_path / "absent.json")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"shapes": []}))
    with pytest.raises(SystemExit, match="no benchmark entries"):
        bench.merge([other], tmp_path / "unused.json")
