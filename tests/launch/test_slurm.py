"""The sbatch script's command construction, run with a fake SLURM (env vars, srun, scontrol)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys, pathlib
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"tool": "srun", "args": sys.argv[1:]}) + "\\n")
if os.environ.get("FAKE_PREEMPT"):
    run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("run.dir=")][-1]
    pathlib.Path(run_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(run_dir) / "preempted").write_text("step 7: received SIGUSR1\\n")
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

FAKE_SCONTROL = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"tool": "scontrol", "args": sys.argv[1:]}) + "\\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("gpu-node-07\\ngpu-node-08")
"""


def sbatch(tmp_path, *args, **env_extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NAME": "moe", **env_extra,
    }
    proc = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def test_one_torchrun_per_node_with_rendezvous_on_the_first_node(tmp_path):
    proc, calls = sbatch(tmp_path, "+experiment=tiny", "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr
    srun = [c["args"] for c in calls if c["tool"] == "srun"]
    assert len(srun) == 1
    args = srun[0]
    assert args[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # torchrun runs behind a shell that makes it ignore SIGUSR1 (only the ranks handle it)
    assert args[2:4] == ["bash", "-c"] and "trap \"\" USR1" in args[4]
    torchrun = args[args.index("torchrun"):]
    assert torchrun == [
        "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu-node-07:29500", "-m", "moetrain.train",
        "+experiment=tiny", "parallel.tp=2", "run.dir=outputs/moe-4242",
    ]
    assert not any(c["args"][:1] == ["requeue"] for c in calls if c["tool"] == "scontrol")


def test_a_given_run_dir_and_port_are_kept(tmp_path):
    proc, calls = sbatch(tmp_path, "+experiment=tiny", "run.dir=/shared/run", MASTER_PORT="6000",
                         GPUS_PER_NODE="8")
    torchrun = next(c["args"] for c in calls if c["tool"] == "srun")
    torchrun = torchrun[torchrun.index("torchrun"):]
    assert "--rdzv_endpoint=gpu-node-07:6000" in torchrun and "--nproc_per_node=8" in torchrun
    assert [a for a in torchrun if a.startswith("run.dir=")] == ["run.dir=/shared/run"]


def test_a_preempted_run_is_requeued_and_a_failed_one_is_not(tmp_path):
    proc, calls = sbatch(tmp_path, "+experiment=tiny", FAKE_PREEMPT="1")
    assert proc.returncode == 0 and "requeueing job 4242" in proc.stdout
    assert ["requeue", "4242"] in [c["args"] for c in calls if c["tool"] == "scontrol"]

    second = tmp_path / "second"
    second.mkdir()
    proc, calls = sbatch(second, "+experiment=tiny", FAKE_EXIT="3")
    assert proc.returncode == 3
    assert ["requeue", "4242"] not in [c["args"] for c in calls if c["tool"] == "scontrol"]


def test_outside_slurm_the_script_refuses_to_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH), "+experiment=tiny"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


@pytest.mark.parametrize("line", ["#SBATCH --requeue", "#SBATCH --signal=USR1@120",
                                  "#SBATCH --ntasks-per-node=1"])
def test_the_batch_header_asks_for_requeue_signal_and_one_task_per_node(line):
    assert line in SBATCH.read_text().splitlines()
