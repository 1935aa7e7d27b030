"""Every command in the README's bash blocks runs here, or is listed as skipped with the reason,
so the README's examples cannot rot.

Commands run from a temporary working directory (so `outputs/...` lands there), with repository
paths made absolute, `/tmp/...` moved into the temporary directory and `outputs/tiny-<time>`
meaning the run the README's first training command made. A command that trains or benchmarks
gets small sizes appended (later arguments win, for Hydra overrides and argparse options alike).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.fp8 import torchao_available
from tests.fp8 import TORCHAO_MISSING

REPO = Path(__file__).resolve().parents[1]

SMALL_RUN = ("train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
             "train.eval_every=0", "logging.progress=false")
TINY_TRAIN = "python -m moetrain.train +experiment=tiny"

# README command -> the arguments appended to it (small sizes).
RUN: dict[str, tuple[str, ...]] = {
    TINY_TRAIN: SMALL_RUN,
    "python -m moetrain.train +experiment=tiny train.max_steps=200 model.moe.top_k=1 "
    "run.dir=outputs/k1": SMALL_RUN,
    "python -m moetrain.torchrun --standalone --nproc_per_node 4 -m moetrain.train +experiment=tiny "
    "run.dir=outputs/dp4": (*SMALL_RUN, "train.max_steps=1", "train.global_batch_size=8"),
    "python -m moetrain.batches --run outputs/tiny-<time> --step 2": (),
    "python -m moetrain.batches --run outputs/tiny-<time> --val --out /tmp/val.jsonl": (),
    "python -m moetrain.layout --world-size 8 parallel.tp=2 parallel.ep=4 model.moe.num_experts=8": (),
    "python -m moetrain.train +experiment=tiny model.mtp.depth=1 data.document_mask=true "
    "run.dir=outputs/mtp": SMALL_RUN,
    "python -m moetrain.plan +experiment=deepseek_v3 parallel.pp=16 parallel.ep=64 "
    "--world-size 2048 \"parallel.pp_layers=[4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,1]\"": (),
    "python scripts/prepare_data.py --corpus data/corpus --out /tmp/prepared --vocab-size 8192": (),
    "python -m moetrain.plan +experiment=mixtral_8x7b parallel.tp=2 parallel.ep=8 parallel.pp=4 "
    "--world-size 64": (),
    "python scripts/plot_routing.py outputs/tiny-<time>": (),
    "python scripts/bench_dispatcher.py --ranks 2 4":
        ("--ranks", "2", "--tokens", "64", "--dim", "32", "--iters", "1", "--warmup", "0"),
    "python scripts/bench_checkpoint.py --steps 20 --save-every 5":
        ("train.global_batch_size=4", "--steps", "3", "--save-every", "1", "--warmup", "1"),
    "python scripts/bench_init.py --experiments olmoe_1b_7b --layers 1 --ranks 1 2":
        ("--layers", "1", "model.vocab_size=1024", "model.moe.num_experts=16"),
    "python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 --world-size 8": (),
    "python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 parallel.pp=2 "
    "--world-size 16": (),
    "python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 --world-size 8 --gpu h100": (),
    "python -m moetrain.plan +experiment=qwen3_30b_a3b --world-size 16 --gpu h100 --search": (),
    # the 2,048-rank dry run takes ~20 CPU seconds (docs/planning.md): here 4 layers on 8 ranks
    "python -m moetrain.plan +experiment=deepseek_v3 parallel.pp=16 parallel.ep=64 "
    '"parallel.pp_layers=[3,4,4,4,4,4,4,4,4,4,4,4,4,4,3,3]" --world-size 2048 --dry-run':
        ("--world-size", "8", "parallel.pp=1", "parallel.pp_layers=null", "parallel.ep=8",
         "model.n_layers=4"),
    "python scripts/lbl_experiment.py --steps 200":
        ("--steps", "2", "--global-batch", "4", "--eval-batches", "1", "--windows", "1"),
    "python -m moetrain.train +experiment=tiny optim=muon optim.qk_clip_threshold=100 "
    "run.dir=outputs/muon": SMALL_RUN,
    "python scripts/inspect_checkpoint.py outputs/tiny-<time>": (),
    "python scripts/convert_checkpoint.py outputs/tiny-<time> --to safetensors /tmp/flat": (),
    "python -m moetrain.train +experiment=tiny train.fp8=rowwise run.dir=outputs/fp8": SMALL_RUN,
    "python scripts/bench_fp8_quality.py --models tiny":
        ("--recipes", "none,mxfp8", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
         "--global-batch", "2", "--seq-len", "32"),
}

# README commands that train or measure with train.fp8: skipped where torchao is missing
NEEDS_TORCHAO = {"python -m moetrain.train +experiment=tiny train.fp8=rowwise run.dir=outputs/fp8",
                 "python scripts/bench_fp8_quality.py --models tiny"}

ENVIRONMENT = "sets up the environment these tests run in (a venv, packages from the network)"
SKIPPED: dict[str, str] = {
    "python3 -m venv .venv": ENVIRONMENT,
    ". .venv/bin/activate": ENVIRONMENT,
    "pip install torch==2.13.0": ENVIRONMENT,
    "pip install -e .": ENVIRONMENT,
    "pip install -q torch==2.13.0": ENVIRONMENT,
    'pip install -q -e ".[dev,ref]"': ENVIRONMENT,
    "python -m pytest -q": "the test suite itself",
    "python scripts/bench_moe_layer.py --shapes mixtral,olmoe,qwen3":
        "needs a GPU (real Mixtral / OLMoE / Qwen3 shapes in bf16); tests/test_bench_scripts.py "
        "runs the script at small CPU shapes",
    "launch/local.sh 8 +experiment=olmoe_1b_7b parallel.ep=8": "needs 8 GPUs for OLMoE-1B-7B",
    "python scripts/bench_kernels.py":
        "needs a GPU (compiled Triton); tests/test_bench_kernels.py runs it at small CPU shapes "
        "through the interpreter",
    "bash scripts/gpu_check.sh": "needs a GPU; tests/test_gpu_check.py tests its CPU-side logic",
    "python scripts/bench_optim.py quality":
        "hours of training on a CPU; tests/test_bench_scripts.py runs its sweep, seeds and "
        "comparison over stand-in runs",
    "python scripts/bench_optim.py cost --ranks 1 2 4":
        "minutes per rank count at the OLMoE block shape; tests/test_gpu_check.py runs it on 1 "
        "and 2 ranks at small shapes (the GPU check's smoke profile)",
    "python scripts/bench_fp8.py":
        "needs a GPU (real shapes, FP8 kernels); tests/fp8/test_bench_fp8.py runs it at a small "
        "CPU shape, emulated",
    "python -m moetrain.hf export outputs/olmoe-<time> /tmp/olmoe-hf":
        "needs a run of the real-size OLMoE experiment; tests/hf/test_round_trip.py exports tiny "
        "models of every family and loads them with transformers",
    "python -m moetrain.hf overrides /models/OLMoE-1B-7B-0924":
        "needs the released OLMoE weights; tests/hf/test_cli.py prints the overrides of local "
        "tiny models of every family",
    "python -m moetrain.torchrun --nproc_per_node 8 -m moetrain.train +experiment=olmoe_1b_7b "
    "$(python -m moetrain.hf overrides /models/OLMoE-1B-7B-0924) "
    "model.init.from_hf=/models/OLMoE-1B-7B-0924 parallel.ep=8": "needs 8 GPUs and the released weights; tests/hf/test_round_trip.py imports "
                     "tiny models into ep2 x tp2",
    "python scripts/prepare_data.py data=mixture_example model.vocab_size=128256 "
    "--out /data/prepared/mix": "needs the user's data (/data/...); tests/e2e/test_data_cli.py "
                                "prepares and trains a jsonl.gz + parquet mixture",
    "python -m moetrain.torchrun --nproc_per_node 8 -m moetrain.train +experiment=olmoe_1b_7b "
    "data=mixture_example model.vocab_size=128256 data.prepared_dir=/data/prepared/mix":
        "needs 8 GPUs and the user's prepared data",
    "sbatch --nodes=4 launch/slurm/train.sbatch +experiment=mixtral_8x7b parallel.tp=2 "
    "parallel.ep=8 run.dir=/shared/runs/mixtral":
        "needs a multi-node GPU SLURM cluster; tests/launch/test_sbatch_command.py checks the "
        "command it builds for GPU nodes",
    "sbatch --nodes=1 --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 "
    "launch/slurm/train.sbatch +experiment=tiny train.device=cpu run.dir=runs/tiny":
        "needs a SLURM cluster; tests/launch/test_slurm.py submits exactly this on a real "
        "single-node SLURM that it starts",
}


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks, in order: `\\` continuations joined,
    comments dropped, `a && b` split into its commands, whitespace normalised."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = readme_commands()
    assert commands, "no ```bash blocks found in README.md"
    assert not set(RUN) & set(SKIPPED)
    assert NEEDS_TORCHAO <= set(RUN)
    unlisted = [c for c in commands if c not in RUN and c not in SKIPPED]
    assert not unlisted, f"README commands neither run nor listed as skipped: {unlisted}"
    stale = [c for c in [*RUN, *SKIPPED] if c not in commands]
    assert not stale, f"listed here but no longer in the README: {stale}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = [_localise(arg, cwd) for arg in shlex.split(command)] + list(RUN[command])
    if argv[0] == "python":  # after localising: the interpreter may itself live under /tmp
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _localise(arg: str, cwd: Path) -> str:
    if arg.startswith("/tmp/"):
        return str(cwd / arg[len("/tmp/"):])
    if arg == "outputs/tiny-<time>":
        runs = sorted((cwd / "outputs").glob("tiny-*"))
        assert len(runs) == 1, f"expected the one run of {TINY_TRAIN!r}, found {runs}"
        return str(runs[0])
    if not arg.startswith(("/", "-", "+")) and "=" not in arg and (REPO / arg).exists():
        return str(REPO / arg)  # scripts/..., data/corpus
    return arg


@pytest.fixture(scope="module")
def tiny_run(workdir) -> Path:
    """The README's first training command: its run directory, outputs/tiny-<time>."""
    run(TINY_TRAIN, workdir)
    (path,) = (workdir / "outputs").glob("tiny-*")
    return path


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, workdir, tiny_run):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    if command in NEEDS_TORCHAO and not torchao_available():
        pytest.skip(TORCHAO_MISSING)
    if command == TINY_TRAIN:  # ran for the fixture
        assert (tiny_run / "checkpoints" / "latest").read_text().strip() == "step_2"
        return
    run(command, workdir)
