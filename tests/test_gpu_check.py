"""scripts/gpu_check.py (and its wrapper scripts/gpu_check.sh): arguments, the JSON it writes,
failures, timeouts and the deadline, on the CPU."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_bench_scripts import ROOT, SCRIPTS, load


@pytest.fixture(scope="module")
def check():
    return load("gpu_check")


@pytest.mark.parametrize("args, message", [
    (["--only", "env,bogus"], "--only: unknown step bogus; known: install, env"),
    (["--skip", "gpu"], "--skip: unknown step gpu"),
    (["--deadline", "20"], "--deadline must exceed 25 seconds"),
])
def test_bad_arguments_exit_2(check, args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        rc = check.main(args + ["--out-dir", str(tmp_path / "out")])
        raise SystemExit(rc)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    """Running (a killed orphan may stay a zombie until init reaps it)."""
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_failures_timeouts_and_the_deadline_are_recorded(check, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "RESERVE_S", 0)
    monkeypatch.setattr(check, "MIN_STEP_S", 1)
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    grandchild = tmp_path / "grandchild.pid"
    running = tmp_path / "while_running.json"
    steps = [
        check.Step("ok", py(f"import json; print('hello'); json.dump({{'x': 1}}, open({str(work / 'r.json')!r}, 'w'))"),
                   30, "r.json"),
        check.Step("bad", py("import sys; print('boom'); sys.exit(3)"), 30),
        check.Step("absent", py("import sys; print(\"Could not override 'train.compile'\"); sys.exit(1)"),
                   30, unavailable_if=(r"Could not override 'train\.compile'", "no train.compile yet")),
        check.Step("hang", py(
            "import shutil, subprocess, time\n"
            f"shutil.copy({str(out / 'gpu_check.json')!r}, {str(running)!r})\n"
            f"p = subprocess.Popen(['sleep', '300']); open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
            "print('waiting', flush=True); time.sleep(300)"), 300),
        check.Step("late", py("print('never')"), 30),
    ]
    report = {"steps": {}, "summary": {}}
    start = time.monotonic()
    report = check.run_steps(steps, out, work, 5.0, report)
    assert time.monotonic() - start < 8  # the hang is cut at the deadline, not its 300 s budget
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert on_disk == report
    s = report["steps"]
    assert s["ok"]["status"] == "ok" and s["ok"]["result"] == {"x": 1} and "hello" in s["ok"]["output_tail"]
    assert s["bad"]["status"] == "failed" and s["bad"]["rc"] == 3 and "boom" in s["bad"]["output_tail"]
    assert s["absent"]["status"] == "unavailable" and s["absent"]["note"] == "no train.compile yet"
    assert s["hang"]["status"] == "timeout" and s["hang"]["rc"] is None
    assert "waiting" in s["hang"]["output_tail"]
    assert s["late"]["status"] == "skipped" and "out of time" in s["late"]["note"]
    assert report["failures"] == ["bad", "hang"]
    # while it ran, the JSON on disk already named the step that was running
    assert json.loads(running.read_text())["steps"]["hang"]["status"] == "running"
    # the whole process group went at the timeout, the grandchild too
    assert not alive(int(grandchild.read_text()))
    log = (out / "gpu_check.log").read_text()
    assert "===== bad" in log and "boom" in log and "never" not in log


def test_summary_of_training_and_kernel_results(check):
    steps = {"train_eager": {"status": "ok", "result": {"tokens_per_s": 1234.56, "mfu": 0.41234}},
             "optim_cost": {"status": "ok", "result": {"rows": [
                 {"layout": "fsdp", "ranks": 1, "adamw_step_s": 0.0123456, "muon_step_s": 0.5}]}},
             "train_compiled": {"status": "unavailable"},
             "bench_kernels": {"status": "ok", "result": {"entries": [
                 {"op": "swiglu", "shape": {"name": "qwen3"}, "torch_ms": 3.0, "triton_ms": 2.0},
                 {"op": "permute", "shape": {"name": "qwen3"}, "torch_ms": 1.0, "triton_ms": None}]}}}
    assert check.summarize(steps) == {
        "train_eager": "ok", "train_compiled": "unavailable", "bench_kernels": "ok",
        "optim_cost": "ok", "optim_fsdp1_adamw_step_s": 0.01235, "optim_fsdp1_muon_step_s": 0.5,
        "train_eager_tokens_per_s": 1234.6, "train_eager_mfu": 0.4123,
        "kernel_qwen3_swiglu_speedup": 1.5}


def test_summary_of_the_moe_graph_and_dispatcher_results(check):
    stalls = {"exact": {"step_ms": 9.0, "queue_ms": 8.5, "host_read_ms": 4.25, "host_reads": 4},
              "sync-free": {"step_ms": 7.0, "queue_ms": 1.5, "host_read_ms": 0.0,
                            "host_reads": 0}}
    capture = {"sync-free": {"status": "ok", "replay_equals_eager": True, "eager_ms": 3.0,
                             "replay_ms": 2.0},
               "exact": {"status": "failed", "expected": True}}
    steps = {"moe_graph": {"status": "ok", "result": {"host_stalls": stalls,
                                                      "graph_capture": capture}},
             "bench_dispatcher": {"status": "ok", "result": {"results": [
                 {"ranks": 2, "variants": {"exact": {"step_ms": 5.0},
                                           "sync-free+overlap": {"step_ms": 4.0}}}]}}}
    assert check.summarize(steps) == {
        "moe_graph": "ok", "bench_dispatcher": "ok",
        "moe_exact_step_ms": 9.0, "moe_exact_host_read_ms": 4.25, "moe_exact_queue_ms": 8.5,
        "moe_sync_free_step_ms": 7.0, "moe_sync_free_host_read_ms": 0.0,
        "moe_sync_free_queue_ms": 1.5, "moe_graph_capture": "ok",
        "moe_graph_replay_equals_eager": True, "moe_graph_replay_speedup": 1.5,
        "ep2_exact_step_ms": 5.0, "ep2_sync_free_overlap_step_ms": 4.0}


def test_the_dispatcher_bench_is_unavailable_on_one_gpu(check):
    (step,) = [s for s in check.build_steps("gpu", Path("/w"), Path("/none"), Path("/s"))
               if s.name == "bench_dispatcher"]
    pattern, note = step.unavailable_if
    # what scripts/bench_dispatcher.py prints there
    assert re.search(pattern, "error: --device cuda needs 2 GPUs, 1 visible") and "one GPU" in note


def test_pytest_summary_is_parsed(check):
    assert check.parse_pytest("...\n29 passed, 2 skipped, 1 error in 3.1s\n") == \
        {"passed": 29, "skipped": 2, "error": 1}
    assert check.parse_pytest("no tests ran") == {}


def test_smoke_run_through_the_wrapper(tmp_path):
    """The shell entry point on tiny CPU shapes: the JSON holds env, results and a summary
    (the training and kernel benchmarks have their own tests; summaries of them above)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--profile", "smoke", "--only",
         "install,env,bench_moe_layer,optim_cost,moe_graph", "--wheels", str(tmp_path / "none"),
         "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["install", "env", "bench_moe_layer", "optim_cost", "moe_graph"]
    assert steps["install"]["status"] == "skipped" and "no wheels" in steps["install"]["note"]
    assert report["env"]["torch"] and report["env"]["moetrain"] == "importable"
    assert report["env"]["cuda_available"] is False
    assert steps["bench_moe_layer"]["status"] == "ok"
    assert steps["bench_moe_layer"]["result"]["shapes"][0]["agree"] is True
    # the CPU run of the MoE graph check: host reads counted, no GPU to capture on
    graph = steps["moe_graph"]["result"]
    assert steps["moe_graph"]["status"] == "ok", steps["moe_graph"]["output_tail"]
    assert graph["host_stalls"]["exact"]["host_reads"] == 2  # one per layer and forward
    assert graph["host_stalls"]["sync-free"]["host_reads"] == 0
    assert graph["graph_capture"]["status"] == "unavailable"
    summary = report["summary"]
    assert summary["moe_64,128,8,2,256_moetrain_tflops"] > 0 and summary["env"] == "ok"
    # the optimizer step on 1 and 2 CPU ranks: Muon's bytes as planned, less state than AdamW
    rows = {(r["layout"], r["ranks"]): r for r in steps["optim_cost"]["result"]["rows"]}
    assert set(rows) == {("fsdp", 1), ("fsdp", 2), ("ep", 2)}
    assert rows[("fsdp", 1)]["muon_sent_bytes"] == 0
    for r in rows.values():
        assert r["muon_sent_bytes"] == r["muon_plan_bytes"] and r["adamw_sent_bytes"] == 0
        assert r["muon_state_bytes"] < r["adamw_state_bytes"] and r["muon_step_s"] > 0
    assert rows[("fsdp", 2)]["muon_sent_bytes"] > 0
    assert summary["optim_fsdp2_muon_step_s"] > 0
    assert report["failures"] == [] and report["finished"] and report["profile"] == "smoke"
    assert "gpu_check (" in proc.stdout and Path(out / "gpu_check.log").stat().st_size > 0
    assert str(ROOT)  # the wrapper ran from another folder: it changes to the repository root
