"""scripts/bench_moe_layer.py and scripts/bench_train.py on the CPU at tiny shapes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load(name):
    if str(SCRIPTS) not in sys.path:  # the scripts import their shared helpers (benchlib)
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_moe_layer")


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_moe_layer_bench_runs_checks_and_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script(SCRIPTS / "bench_moe_layer.py", "--shape", "64,128,8,2,256", "--dtype", "fp32",
                      "--device", "cpu", "--iters", "2", "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agreement check passed" in proc.stdout and "FAIL" not in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 64,128,8,2,256 |")]
    assert [r.split("|")[7].strip() for r in rows] == ["baseline", "moetrain"]
    assert rows[1].split("|")[-2].strip() == "ok"
    result = json.loads(out.read_text())
    (entry,) = result["shapes"]
    assert entry["agree"] and entry["flops"] == 18 * 256 * 2 * 64 * 128
    assert entry["moetrain"]["tflops"] > 0 and entry["baseline"]["ms"] > 0
    assert entry["moetrain"]["peak_bytes"] is None  # CPU: n/a
    assert max(entry["moetrain_err"].values()) < 1e-4 and result["ceiling_tflops"] > 0


@pytest.mark.parametrize("dtype, perturb", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
def test_agreement_check_passes_and_catches_a_wrong_expert(bench, dtype, perturb):
    shape = bench.parse_shape("32,64,8,2,128")
    cpu = torch.device("cpu")
    good = bench.check_agreement(shape, cpu, dtype, seed=1)
    assert good.ok, good.problems
    bad = bench.check_agreement(shape, cpu, dtype, seed=1, perturb=perturb)
    assert not bad.ok
    assert any(p.startswith("moetrain out:") for p in bad.problems)
    # w2's own gradient does not depend on w2: the perturbation shows everywhere else
    assert not any("grad_w2" in p for p in bad.problems)


def test_failed_check_exits_non_zero(bench, capsys):
    assert bench.main(["--shape", "32,64,4,2,64", "--dtype", "fp32", "--device", "cpu",
                       "--skip-timing", "--perturb", "0.01"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_all_zero_outputs_are_refused(bench, monkeypatch):
    monkeypatch.setattr(bench.MoELayer, "forward", lambda self, x: x * 0)
    result = bench.check_agreement(bench.parse_shape("32,64,4,2,64"), torch.device("cpu"),
                                   torch.float32, seed=2)
    assert not result.ok and any("all zeros" in p for p in result.problems)


def test_baseline_grouped_gemm_equals_the_loop(bench):
    x = torch.randn(40, 16)
    w = torch.randn(4, 16, 8)
    counts = torch.tensor([7, 0, 20, 13])
    torch.testing.assert_close(bench.grouped_gemm(x, w, counts), bench.loop_gemm(x, w, counts))


def test_issue_shapes_and_flops(bench):
    assert set(bench.SHAPES) == {"mixtral", "olmoe", "qwen3"}
    olmoe = bench.SHAPES["olmoe"]
    assert (olmoe.d, olmoe.f, olmoe.experts, olmoe.top_k, olmoe.tokens) == (2048, 1024, 64, 8, 8192)
    assert olmoe.flops == 18 * 8192 * 8 * 2048 * 1024


def test_train_bench_reports_throughput_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    proc = run_script(SCRIPTS / "bench_train.py", "+experiment=tiny", "model.vocab_size=512",
                      "model.n_layers=2", "data.seq_len=32", "train.micro_batch_size=2",
                      "train.recompute=moe", "--steps", "2", "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| tokens/step |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["recompute"] == "moe" and result["n_layers"] == 2 and result["seq_len"] == 32
    assert result["tokens_per_s"] > 0 and result["mfu"] > 0  # no upper bound: a busy CI CPU
    # MFU is the planner's training FLOPs per token times tokens/s over the measured ceiling
    expected = result["train_flops_per_token"] * result["tokens_per_s"] / (result["ceiling_tflops"] * 1e12)
    assert result["mfu"] == pytest.approx(expected)


def test_worst_slice_error_sees_one_wrong_row(bench):
    ref = torch.randn(1000, 64)
    got = ref.clone()
    got[123] *= 1.1
    whole, worst = bench.rel_error(got, ref)
    assert whole < 5e-3 and worst == pytest.approx(0.1, rel=1e-4)
    ref[7] = 0  # an expert without tokens: zero gradient in both is exact, anything else is not
    got[7] = 0
    assert bench.rel_error(got, ref)[1] == pytest.approx(0.1, rel=1e-4)
    got[7, 0] = 1e-3
    assert bench.rel_error(got, ref)[1] == float("inf")


def test_experts_without_tokens_pass(bench):
    # 4 tokens x 2 of 64 experts: most experts get nothing (zero weight-gradient slices)
    result = bench.check_agreement(bench.parse_shape("32,64,64,2,4"), torch.device("cpu"),
                                   torch.float32, seed=3)
    assert result.ok, result.problems


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_variant_agrees_and_a_wrong_expert_is_caught(bench, dtype):
    """The moetrain layer wired to the Triton kernels (through Triton's interpreter on the CPU)."""
    shape = bench.parse_shape("32,64,8,2,64")
    cpu, impls = torch.device("cpu"), ("baseline", "moetrain", "triton")
    good = bench.check_agreement(shape, cpu, dtype, seed=4, impls=impls)
    assert good.ok, good.problems
    assert max(good.err["triton"].values()) <= max(1e-5 if dtype == torch.float32 else 1e-2,
                                                   1.5 * max(good.err["baseline"].values()))
    bad = bench.check_agreement(shape, cpu, dtype, seed=4, perturb=0.05, impls=impls)
    assert any(p.startswith("triton out:") for p in bad.problems)


def test_triton_variant_is_chosen_only_where_it_runs(bench, monkeypatch):
    cpu = torch.device("cpu")
    assert not bench.triton_wanted("auto", cpu, torch.float32)  # the interpreter is not timed
    assert bench.triton_wanted("on", cpu, torch.float32)  # TRITON_INTERPRET=1 (tests/conftest.py)
    assert not bench.triton_wanted("off", cpu, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="--triton on: the Triton kernels cannot run on cpu"):
        bench.triton_wanted("on", cpu, torch.float32)


def test_bench_optim_finds_where_muon_reaches_adamw_and_tabulates():
    bench = load("bench_optim")
    curve = [(10, 5.0), (20, 4.2), (30, 3.9), (40, 3.7)]
    assert bench.first_step_reaching(curve, 4.0) == 30
    assert bench.first_step_reaching(curve, 4.2) == 20
    assert bench.first_step_reaching(curve, 3.0) is None
    result = {"models": {"tiny": {"best_lr": {"adamw": 0.003, "muon": 0.01},
                                  "sweep": {"adamw": {0.003: 4.0}, "muon": {0.01: 3.7}},
                                  "seeds": [{"seed": 0, "adamw_final": 4.0, "muon_final": 3.7,
                                             "muon_reaches_adamw_final_at": 30,
                                             "token_efficiency": 40 / 30}]}}}
    table = bench.quality_table(result)
    assert "| tiny | 0 | 0.003 | 0.01 | 4.0000 | 3.7000 | 30 | 1.33x |" in table


def test_bench_optim_sweeps_on_the_first_seed_then_runs_the_best_rates(tmp_path, monkeypatch):
    """The quality protocol over stand-in runs (the training itself is the command line's):
    every rate on seed 0, the lowest final validation loss picked per optimizer, only those
    on the other seeds, and Muon's step at AdamW's final loss."""
    bench = load("bench_optim")
    calls = []

    def fake_train(run_dir, overrides):
        opt = next(o for o in overrides if o.startswith("optim="))[6:]
        lr = float(next(o for o in overrides if o.startswith("optim.lr="))[9:])
        seed = int(next(o for o in overrides if o.startswith("train.seed="))[11:])
        calls.append((opt, lr, seed))
        best = 3e-3 if opt == "adamw" else 1e-2
        floor = (4.0 if opt == "adamw" else 3.5) + abs(lr - best) * 10 + seed * 0.01
        return [{"step": s, "val_loss": floor + 1.0 / s} for s in (10, 20, 30, 40)]

    monkeypatch.setattr(bench, "_train", fake_train)
    args = bench.main.__globals__["argparse"].Namespace(
        models=["tiny"], steps=40, eval_every=10, seeds=[0, 1], lr_adamw=[1e-3, 3e-3],
        lr_muon=[3e-3, 1e-2], workers=1, out=str(tmp_path))
    result = bench.quality(args)
    assert sorted(c for c in calls if c[2] == 0) == sorted(
        [("adamw", 1e-3, 0), ("adamw", 3e-3, 0), ("muon", 3e-3, 0), ("muon", 1e-2, 0)])
    assert sorted(c for c in calls if c[2] == 1) == [("adamw", 3e-3, 1), ("muon", 1e-2, 1)]
    tiny = result["models"]["tiny"]
    assert tiny["best_lr"] == {"adamw": 3e-3, "muon": 1e-2}
    # AdamW ends at 4.0 + 1/40 (+0.01 for seed 1); Muon's curve 3.5 + 1/s reaches it at step 10
    assert [row["muon_reaches_adamw_final_at"] for row in tiny["seeds"]] == [10, 10]
    assert tiny["seeds"][0]["token_efficiency"] == 4.0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_documents_bench_agrees_and_reports_both_paths(tmp_path):
    """scripts/bench_documents.py on a tiny CPU shape (flex attention eager, forward only)."""
    bench = load("bench_documents")
    out = tmp_path / "docs.json"
    assert bench.main(["--device", "cpu", "--shape", "1,4,2,256,16", "--doc", "30",
                       "--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rel_err"] < 1e-5 and result["dense_ms"] > 0 and result["flex_ms"] > 0
    assert 0 < result["blocks_skipped"] < 1 and result["backward"] is False
    assert bench.main(["--shape", "1,2,3"]) == 2


def test_mtp_bench_refuses_unknown_models_and_tables_its_runs(capsys):
    """scripts/bench_mtp.py: an unknown --models entry is one line and exit 2 (nothing run);
    the table shows each run's main-token val_loss, its MTP loss or '-', the step time."""
    bench = load("bench_mtp")
    assert bench.main(["--models", "tiny,huge", "--out", "x.json"]) == 2
    assert "--models: unknown ['huge']" in capsys.readouterr().err
    run = {"model": "tiny", "seed": 1, "val_loss": 7.5, "step_time_s": 0.25}
    table = bench.table({"runs": [{**run, "variant": "mtp0", "val_mtp_loss_1": None},
                                  {**run, "variant": "mtp1", "val_mtp_loss_1": 7.625}]})
    assert table.splitlines()[2:] == ["| tiny | 1 | mtp0 | 7.5000 | - | 0.25 |",
                                      "| tiny | 1 | mtp1 | 7.5000 | 7.6250 | 0.25 |"]
