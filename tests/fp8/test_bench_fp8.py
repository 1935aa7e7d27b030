"""The FP8 measurements of the GPU check on the CPU (emulated, tiny shapes): scripts/bench_fp8.py,
scripts/bench_train.py --fp8 and gpu_check's summary of both (the numbers themselves come from
a GPU: docs/fp8.md, "The GPU check")."""

from __future__ import annotations

import json

from tests.fp8 import needs_torchao
from tests.test_bench_scripts import SCRIPTS, load, run_script


@needs_torchao
def test_moe_layer_bench_measures_every_recipe_against_high_precision(tmp_path):
    out = tmp_path / "fp8.json"
    proc = run_script(SCRIPTS / "bench_fp8.py", "--shape", "64,128,8,2,256", "--dtype", "fp32",
                      "--device", "cpu", "--iters", "1", "--warmup", "0", "--json", out,
                      timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| 64,128,8,2,256 |")]
    assert [r[2].strip() for r in rows] == ["high", "rowwise", "mxfp8"]
    (shape,) = json.loads(out.read_text())["shapes"]
    v = shape["variants"]
    assert v["high"]["speedup"] == 1.0 and max(v["high"]["err"].values()) < 1e-5
    for recipe in ("rowwise", "mxfp8"):  # FP8's rounding: a few %, on every tensor
        assert v[recipe]["tflops"] > 0 and v[recipe]["act_bytes"] is None  # CPU: n/a
        assert all(1e-3 < e < 0.15 for e in v[recipe]["err"].values()), v[recipe]["err"]


@needs_torchao
def test_train_bench_runs_the_variants_side_by_side(tmp_path):
    out = tmp_path / "train.json"
    proc = run_script(SCRIPTS / "bench_train.py", "+experiment=tiny", "model.vocab_size=512",
                      "model.n_layers=2", "data.seq_len=32", "train.micro_batch_size=2",
                      "--steps", "1", "--warmup", "1", "--fp8", "none,rowwise,te:tensorwise",
                      "--json", out, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["none", "rowwise", "te:tensorwise"]
    assert variants["none"]["fp8"] is None
    assert variants["rowwise"]["fp8"] == "torchao:rowwise (emulated)"
    assert variants["te:tensorwise"] == {"refused": (
        "train.fp8_backend=te is invalid on the cpu: Transformer Engine runs on NVIDIA GPUs only; "
        "train.fp8_backend=torchao runs every recipe here, emulated")}
    # the same initial weights and batches: the first losses differ by FP8's rounding only
    # (measured 2.1e-3 relative with the tiny recipe's init_std 0.05, 5e-5 with 0.02: the larger
    # logits carry more of the ~10% FP8 error of this 2-layer model's output into the loss)
    a, b = variants["none"]["first_loss"], variants["rowwise"]["first_loss"]
    assert a != b and abs(a - b) < 5e-3 * a


def test_gpu_check_summarizes_the_fp8_steps():
    check = load("gpu_check")
    assert {"bench_fp8", "train_fp8"} <= set(check.STEP_NAMES)
    steps = {
        "bench_fp8": {"status": "ok", "result": {"shapes": [{"shape": {"name": "olmoe"}, "variants": {
            "high": {"tflops": 300.0, "speedup": 1.0},
            "rowwise": {"tflops": 420.123456, "speedup": 1.4004},
            "mxfp8": {"refused": "train.fp8=mxfp8 is invalid on ..."}}}]}},
        "train_fp8": {"status": "ok", "result": {"variants": {
            "none": {"tokens_per_s": 1000.04, "last_loss": 7.12345, "peak_memory_bytes": 2**31},
            "te:tensorwise": {"refused": "..."}}}},
    }
    assert check.summarize(steps) == {
        "bench_fp8": "ok", "train_fp8": "ok",
        "fp8_moe_olmoe_high_tflops": 300.0, "fp8_moe_olmoe_high_speedup": 1.0,
        "fp8_moe_olmoe_rowwise_tflops": 420.1, "fp8_moe_olmoe_rowwise_speedup": 1.4,
        "fp8_moe_olmoe_mxfp8": "not runnable",
        "train_fp8_none_tokens_per_s": 1000.0, "train_fp8_none_last_loss": 7.1235,
        "train_fp8_none_peak_gib": 2.0, "train_fp8_te_tensorwise": "not runnable"}
