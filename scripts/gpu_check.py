"""The prepared GPU check: every GPU measurement of moetrain in one run, one JSON at the end.

    bash scripts/gpu_check.sh                     (on the GPU machine; see docs/performance.md)
    python scripts/gpu_check.py --only env,bench_moe_layer --deadline 300
    python scripts/gpu_check.py --profile smoke --out-dir /tmp/check      (CPU: tiny shapes)

Steps, in order (each a subprocess with its own time budget, cut to what is left of the
`--deadline`; a step that fails or hangs is recorded and the next one runs):

    install          carried wheels (--wheels, default .gpu_wheels/) into a private folder put
                     on PYTHONPATH of the later steps (the GPU machine lacks hydra-core,
                     omegaconf, antlr4-python3-runtime, torchao); skipped without wheels
    env              device, driver, versions, what is importable
    kernel_tests     pytest tests/kernels (compiled on a GPU)
    gpu_tests        pytest -m gpu over the rest of tests/ (none collected: status 'none')
    bench_kernels    scripts/bench_kernels.py: each Triton kernel against the PyTorch path
    bench_moe_layer  scripts/bench_moe_layer.py: mixtral, olmoe, qwen3; baseline, moetrain, triton
    optim_cost       scripts/bench_optim.py cost: the optimizer step of one OLMoE-1B-7B block
                     (64 experts), AdamW against Muon, time and state
    bench_fp8        scripts/bench_fp8.py: the MoE layer at the same shapes, bf16 against each
                     FP8 recipe this GPU runs (docs/fp8.md)
    bench_documents  scripts/bench_documents.py: document-masked attention, SDPA through the dense
                     mask vs compiled flex attention (the path `data.document_mask` takes on CUDA)
    moe_graph        scripts/check_moe_graph.py: host stalls per step of MoE layers with the
                     exact-size expert exchange (a host read per layer) and the sync-free one
                     (none); a CUDA-graph capture of one MoE layer (sync-free: must capture and
                     replay the eager bits; exact: expected to fail)
    bench_dispatcher scripts/bench_dispatcher.py --device cuda: exact / sync-free x overlap
                     off / on over 2 GPUs (NCCL); 'unavailable' on a one-GPU machine
    train_eager      scripts/bench_train.py: OLMoE-1B-7B-shaped, 4 layers, seq 4096
    train_fp8        the same, bf16 against each FP8 variant this GPU runs (torchao tensorwise,
                     rowwise, mxfp8; Transformer Engine tensorwise, mxfp8), side by side in one
                     process, 8 timed steps after 3: tokens/s, TFLOP/s, peak memory, loss
    train_compiled   the same with train.compile=true; 'unavailable' where the config has no
                     train.compile

Output (`--out-dir`, default $OUT or ./gpu_check_out): gpu_check.json, rewritten before and
after every step (a run killed from outside still leaves the steps so far and the one that was
running), and gpu_check.log with every step's full output. The JSON: started, finished,
deadline_s, elapsed_s, profile, env (device, versions), steps {name: status (ok | failed |
timeout | skipped | unavailable | none | running), rc, seconds, budget_s, command, note,
output_tail, result (the step's own JSON)}, failures [names], summary (the headline numbers).
Exit status: 0 when no step failed or timed out, else 1; 2 for bad arguments.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = ["+experiment=olmoe_1b_7b", "model.n_layers=4"]
TRAIN_SMOKE = ["+experiment=tiny", "model.n_layers=2", "model.vocab_size=512", "data.seq_len=32",
               "train.micro_batch_size=2"]
# Each variant against bf16 ("none"); those the GPU cannot run are recorded with the reason.
FP8_VARIANTS = "none,tensorwise,rowwise,mxfp8,te:tensorwise,te:mxfp8"
RESERVE_S = 10  # kept back from the deadline for writing the JSON
MIN_STEP_S = 15  # a step with less time than this left is skipped

ENV_PROBE = r"""
import importlib.util, json, platform, subprocess
info = {"python": platform.python_version(), "machine": platform.machine()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for name in ("triton", "transformer_engine", "torchao", "hydra", "omegaconf", "datasets",
             "transformers"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        info[name] = None
        continue
    try:
        info[name] = getattr(__import__(name), "__version__", "importable")
    except Exception as e:
        info[name] = f"import error: {e!r}"
try:
    import moetrain.config, moetrain.kernels
    info["moetrain"] = "importable"
except Exception as e:
    info["moetrain"] = f"import error: {e!r}"
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
except Exception as e:
    info["nvidia_smi"] = repr(e)
print("ENV " + json.dumps(info))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    budget_s: float
    result_file: Optional[str] = None  # a JSON the step writes (in the work folder)
    env: dict[str, str] = field(default_factory=dict)
    # (regex over the output, status, note): an expected refusal, e.g. a config key not there yet
    unavailable_if: Optional[tuple[str, str]] = None
    skip_note: Optional[str] = None  # set when there is nothing to do
    adds_path: Optional[str] = None  # a folder the later steps get on PYTHONPATH if this one succeeds


def build_steps(profile: str, work: Path, wheels: Path, site: Path) -> list[Step]:
    smoke = profile == "smoke"
    wheel_files = sorted(str(p) for p in wheels.glob("*.whl"))
    steps = [
        Step("install", [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                         "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                         *wheel_files], 90, adds_path=str(site),
             skip_note=None if wheel_files else f"no wheels in {wheels} (scripts/fetch_gpu_wheels.sh)"),
        Step("env", [PY, "-c", ENV_PROBE], 60),
        Step("kernel_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"],
             150),
        Step("gpu_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests", "--ignore=tests/kernels"], 90),
        Step("bench_kernels", [PY, "scripts/bench_kernels.py", "--json", str(work / "bench_kernels.json"),
                               *(["--shape", "64,96,8,2,128", "--device", "cpu", "--iters", "2",
                                  "--warmup", "1"] if smoke else ["--iters", "20", "--warmup", "5"])],
             120, "bench_kernels.json"),
        Step("bench_moe_layer", [PY, "scripts/bench_moe_layer.py", "--json", str(work / "bench_moe_layer.json"),
                                 *(["--shape", "64,128,8,2,256", "--dtype", "fp32", "--device",
                                    "cpu", "--iters", "2", "--warmup", "1"] if smoke
                                   else ["--iters", "10", "--warmup", "3"])],
             210, "bench_moe_layer.json"),
        Step("optim_cost", [PY, "scripts/bench_optim.py", "cost", "--json", str(work / "optim_cost.json"),
                            *(["--device", "cpu", "--ranks", "1", "2", "--d-model", "128", "--heads",
                               "4", "--expert-hidden", "64", "--experts", "4", "--plan-experts", "8",
                               "--iters", "1", "--warmup", "1"] if smoke
                              else ["--device", "cuda", "--ranks", "1", "--experts", "64",
                                    "--plan-experts", "64", "--iters", "5", "--warmup", "2"])],
             120, "optim_cost.json"),
        Step("bench_fp8", [PY, "scripts/bench_fp8.py", "--json", str(work / "bench_fp8.json"),
                           *(["--shape", "64,128,8,2,256", "--dtype", "fp32", "--device", "cpu",
                              "--iters", "1", "--warmup", "1"] if smoke
                             else ["--iters", "10", "--warmup", "3"])],
             150, "bench_fp8.json"),
        Step("bench_documents", [PY, "scripts/bench_documents.py", "--json", str(work / "bench_documents.json"),
                                 *(["--shape", "1,4,2,256,32", "--doc", "50", "--device", "cpu",
                                    "--iters", "2", "--warmup", "1"] if smoke
                                   else ["--iters", "20", "--warmup", "5"])],
             90, "bench_documents.json"),
        Step("moe_graph", [PY, "scripts/check_moe_graph.py", "--json", str(work / "moe_graph.json"),
                           *(["--device", "cpu", "--dtype", "fp32", "--layers", "2", "--tokens",
                              "64", "--dim", "32", "--experts", "4", "--expert-hidden", "16",
                              "--iters", "2", "--warmup", "1"] if smoke else [])],
             120, "moe_graph.json"),
        Step("bench_dispatcher", [PY, "scripts/bench_dispatcher.py", "--json",
                                  str(work / "bench_dispatcher.json"),
                                  *(["--ranks", "2", "--tokens", "64", "--dim", "32",
                                     "--expert-hidden", "16", "--experts", "4", "--shared-hidden",
                                     "16", "--iters", "2", "--warmup", "1"] if smoke else
                                    ["--device", "cuda", "--dtype", "bf16", "--ranks", "2",
                                     "--tokens", "8192", "--dim", "2048", "--expert-hidden", "768",
                                     "--experts", "16", "--shared-hidden", "2048"])],
             150, "bench_dispatcher.json",
             unavailable_if=(r"--device cuda needs 2 GPUs", "one GPU: the expert all-to-all "
                                                            "needs two ranks")),
    ]
    train = TRAIN_SMOKE if smoke else TRAIN
    counts = ["--steps", "2", "--warmup", "1"] if smoke else ["--steps", "8", "--warmup", "3"]
    steps += [
        Step("train_eager", [PY, "scripts/bench_train.py", *train, *counts, "--json",
                             str(work / "train_eager.json")], 150, "train_eager.json"),
        Step("train_fp8", [PY, "scripts/bench_train.py", *train, *counts, "--fp8", FP8_VARIANTS,
                           "--json", str(work / "train_fp8.json")], 240, "train_fp8.json"),
        Step("train_compiled", [PY, "scripts/bench_train.py", *train, "train.compile=true", *counts,
                                "--json", str(work / "train_compiled.json")], 210,
             "train_compiled.json",
             unavailable_if=(r"Could not override 'train\.compile'|Key 'compile' is not in struct",
                             "this tree's config has no train.compile")),
    ]
    return steps


STEP_NAMES = ("install", "env", "kernel_tests", "gpu_tests", "bench_kernels", "bench_moe_layer",
              "optim_cost", "bench_fp8", "bench_documents", "moe_graph", "bench_dispatcher",
              "train_eager", "train_fp8", "train_compiled")


# -- running --------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(report: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def run_command(argv: list[str], timeout_s: float, log, env: dict[str, str]) -> tuple[Optional[int], str, float]:
    """(exit status or None on timeout, the output, seconds). The command runs in its own
    process group, killed whole at the timeout (pytest and compile workers included)."""
    start = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as buf:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=buf, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        buf.seek(0)
        output = buf.read()
    log.write(output)
    log.flush()
    return rc, output, time.monotonic() - start


def parse_pytest(output: str) -> dict:
    """Counts from pytest's last summary line, e.g. '29 passed, 2 skipped in 3.1s'."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found:
            counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}
            break
    return counts


def run_steps(steps: list[Step], out_dir: Path, work: Path, deadline_s: float,
              report: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = out_dir / "gpu_check.json", out_dir / "gpu_check.log"
    start = time.monotonic()
    # moetrain from this tree (the GPU machine does not install it)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(log_path, "a") as log:
        for step in steps:
            left = deadline_s - (time.monotonic() - start) - RESERVE_S
            entry = {"status": "running", "command": shlex.join(step.argv), "budget_s": step.budget_s,
                     "started": _now()}
            report["steps"][step.name] = entry
            if left < MIN_STEP_S:
                entry.update(status="skipped", note=f"out of time ({max(left, 0):.0f} s left of "
                                                    f"the {deadline_s:.0f} s deadline)")
                write_json(report, json_path)
                continue
            if step.skip_note:
                entry.update(status="skipped", note=step.skip_note)
                write_json(report, json_path)
                continue
            write_json(report, json_path)  # a run killed now shows which step was running
            timeout = min(step.budget_s, left)
            log.write(f"\n===== {step.name} ({_now()}, budget {timeout:.0f} s): {entry['command']}\n")
            log.flush()
            rc, output, seconds = run_command(step.argv, timeout, log, {**env, **step.env})
            entry.update(rc=rc, seconds=round(seconds, 1), output_tail=output[-3000:])
            if rc is None:
                entry.update(status="timeout", note=f"killed after {timeout:.0f} s")
            elif rc == 0:
                entry["status"] = "ok"
            elif step.unavailable_if and re.search(step.unavailable_if[0], output):
                entry.update(status="unavailable", note=step.unavailable_if[1])
            elif step.name == "gpu_tests" and rc == 5:
                entry.update(status="none", note="no test is marked gpu")
            else:
                entry["status"] = "failed"
            if step.name.endswith("tests"):
                entry["result"] = parse_pytest(output)
            elif step.name == "env":
                line = next((ln for ln in output.splitlines() if ln.startswith("ENV ")), None)
                entry["result"] = json.loads(line[4:]) if line else None
                report["env"] = entry["result"]
            if step.adds_path and rc == 0:
                env["PYTHONPATH"] = os.pathsep.join((step.adds_path, env["PYTHONPATH"]))
            if step.result_file and (work / step.result_file).is_file():
                try:
                    entry["result"] = json.loads((work / step.result_file).read_text())
                except json.JSONDecodeError as e:
                    entry["result"] = None
                    entry["note"] = f"unreadable result file: {e}"
            write_json(report, json_path)
    report["finished"] = _now()
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["failures"] = [n for n, s in report["steps"].items() if s["status"] in ("failed", "timeout")]
    report["summary"] = summarize(report["steps"])
    write_json(report, json_path)
    return report


# -- summary --------------------------------------------------------------------------------------


def summarize(steps: dict) -> dict:
    """The headline numbers of the step results (absent where a step did not produce them)."""
    summary: dict = {name: s["status"] for name, s in steps.items()}
    moe = (steps.get("bench_moe_layer") or {}).get("result") or {}
    for shape in moe.get("shapes", []):
        name = shape["shape"]["name"]
        for impl in moe.get("impls", []):
            t = shape.get(impl)
            if t:
                # 4 significant digits (not decimals: a loaded CPU's smoke run is < 1e-4)
                summary[f"moe_{name}_{impl}_tflops"] = float(f"{t['tflops']:.4g}")
                if t.get("act_bytes") is not None:
                    summary[f"moe_{name}_{impl}_act_mib"] = round(t["act_bytes"] / 2**20, 1)
        summary[f"moe_{name}_agree"] = shape.get("agree")
    for mode in ("eager", "compiled"):
        r = (steps.get(f"train_{mode}") or {}).get("result") or {}
        if r:
            summary[f"train_{mode}_tokens_per_s"] = round(r["tokens_per_s"], 1)
            summary[f"train_{mode}_mfu"] = round(r["mfu"], 4)
    optim = (steps.get("optim_cost") or {}).get("result") or {}
    for row in optim.get("rows", []):
        key = f"optim_{row['layout']}{row['ranks']}"
        summary[f"{key}_adamw_step_s"] = round(row["adamw_step_s"], 5)
        summary[f"{key}_muon_step_s"] = round(row["muon_step_s"], 5)
    fp8 = (steps.get("bench_fp8") or {}).get("result") or {}
    for shape in fp8.get("shapes", []):
        name = shape["shape"]["name"]
        for variant, r in shape.get("variants", {}).items():
            if "tflops" in r:
                summary[f"fp8_moe_{name}_{variant}_tflops"] = float(f"{r['tflops']:.4g}")
                summary[f"fp8_moe_{name}_{variant}_speedup"] = round(r["speedup"], 3)
            elif "refused" in r:
                summary[f"fp8_moe_{name}_{variant}"] = "not runnable"
    train_fp8 = ((steps.get("train_fp8") or {}).get("result") or {}).get("variants", {})
    for variant, r in train_fp8.items():
        key = f"train_fp8_{variant.replace(':', '_')}"
        if "tokens_per_s" in r:
            summary[f"{key}_tokens_per_s"] = round(r["tokens_per_s"], 1)
            summary[f"{key}_last_loss"] = round(r["last_loss"], 4)
            if r.get("peak_memory_bytes") is not None:
                summary[f"{key}_peak_gib"] = round(r["peak_memory_bytes"] / 2**30, 2)
        else:
            summary[key] = "not runnable"
    docs = (steps.get("bench_documents") or {}).get("result") or {}
    if docs:
        summary["documents_flex_speedup"] = round(docs["speedup"], 3)
        summary["documents_flex_rel_err"] = docs["rel_err"]
    graph = (steps.get("moe_graph") or {}).get("result") or {}
    for name, v in (graph.get("host_stalls") or {}).items():
        key = name.replace("-", "_")
        summary[f"moe_{key}_step_ms"] = round(v["step_ms"], 3)
        summary[f"moe_{key}_host_read_ms"] = round(v["host_read_ms"], 3)
        summary[f"moe_{key}_queue_ms"] = round(v["queue_ms"], 3)
    capture = (graph.get("graph_capture") or {}).get("sync-free")
    if capture:
        summary["moe_graph_capture"] = capture.get("status")
        if capture.get("status") == "ok":
            summary["moe_graph_replay_equals_eager"] = capture.get("replay_equals_eager")
            summary["moe_graph_replay_speedup"] = round(capture["eager_ms"] / capture["replay_ms"], 3)
    disp = (steps.get("bench_dispatcher") or {}).get("result") or {}
    for r in disp.get("results", []):
        for name, v in r["variants"].items():
            summary[f"ep{r['ranks']}_{name.replace('-', '_').replace('+', '_')}_step_ms"] = \
                round(v["step_ms"], 3)
    kern = (steps.get("bench_kernels") or {}).get("result") or {}
    for e in kern.get("entries", []):
        if e.get("triton_ms"):
            summary[f"kernel_{e['shape']['name']}_{e['op']}_speedup"] = round(e["torch_ms"] / e["triton_ms"], 3)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT") or "gpu_check_out",
                   help="where gpu_check.json and gpu_check.log go (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--deadline", type=float, default=450.0,
                   help="seconds for all steps together (default 450: the device call's 8 minutes "
                        "with room to spare)")
    p.add_argument("--only", default=None, help="comma list of steps to run: " + ", ".join(STEP_NAMES))
    p.add_argument("--skip", default=None, help="comma list of steps to leave out")
    p.add_argument("--profile", choices=("gpu", "smoke"), default="gpu",
                   help="gpu: the real shapes; smoke: tiny CPU shapes (tests the check itself)")
    p.add_argument("--wheels", default=str(ROOT / ".gpu_wheels"), help="folder of carried wheels")
    args = p.parse_args(argv)

    def names(text: Optional[str], option: str) -> list[str]:
        chosen = [n for n in (text or "").split(",") if n]
        bad = [n for n in chosen if n not in STEP_NAMES]
        if bad:
            print(f"error: {option}: unknown step {', '.join(bad)}; known: {', '.join(STEP_NAMES)}",
                  file=sys.stderr)
            raise SystemExit(2)
        return chosen

    only, skip = names(args.only, "--only"), names(args.skip, "--skip")
    if not args.deadline > RESERVE_S + MIN_STEP_S:
        print(f"error: --deadline must exceed {RESERVE_S + MIN_STEP_S} seconds", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out-dir {out_dir} is not a folder", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    site = work / "site"
    steps = [s for s in build_steps(args.profile, work, Path(args.wheels), site)
             if (not only or s.name in only) and s.name not in skip]
    report = {"format": 1, "started": _now(), "finished": None, "profile": args.profile,
              "deadline_s": args.deadline, "argv": sys.argv[1:] if argv is None else argv,
              "env": None, "steps": {}, "failures": [], "summary": {}}
    report = run_steps(steps, out_dir, work, args.deadline, report)
    width = max((len(n) for n in report["steps"]), default=4)
    print(f"\ngpu_check ({report['elapsed_s']} s) -> {out_dir / 'gpu_check.json'}")
    for name, s in report["steps"].items():
        print(f"  {name:<{width}}  {s['status']:<11} {s.get('seconds', '-')!s:>6} s  {s.get('note', '')}")
    for key, value in report["summary"].items():
        if key not in report["steps"]:
            print(f"  {key} = {value}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
