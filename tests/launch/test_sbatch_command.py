"""What train.sbatch starts on allocations the test cluster cannot offer (GPUs, several nodes),
and what it makes of a run's leftover files (a stale `preempted` marker): srun and scontrol are
stand-ins that record their arguments. Everything SLURM really does (signals, requeues, two jobs
on a node) is in test_slurm.py, on a real cluster."""

import json
import os
import subprocess
from pathlib import Path

from tests.launch.slurm_jobs import SBATCH

# Records its arguments and whether $FAKE_MARKER (a run's `preempted` marker) exists as the ranks
# would start; exits 0, as ranks that finished the run do.
FAKE_SRUN = """#!/usr/bin/env python3
import json, os, sys
marker = os.environ.get("FAKE_MARKER")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"args": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS"),
                        "marker": bool(marker) and os.path.exists(marker)}) + "\\n")
"""

FAKE_SCONTROL = """#!/usr/bin/env python3
import sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("gpu-node-07\\ngpu-node-08")
elif sys.argv[1:3] == ["show", "node"]:
    print(f"NodeName={sys.argv[3]} Arch=x86_64\\n   NodeAddr=10.1.0.7 NodeHostName=gpu07.example")
"""

GPU_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_JOB_NAME": "moe"}


def sbatch(tmp_path: Path, *args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
           ("OMP_NUM_THREADS", "MASTER_PORT", "MASTER_ADDR", "GPUS_PER_NODE")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), **GPU_JOB, **env_extra)
    proc = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    assert len(calls) == 1, (proc.stdout, proc.stderr)
    return proc, calls[0]


def torchrun_args(call: dict) -> list[str]:
    args = call["args"]
    return args[args.index("--nnodes=2"):]


def test_gpu_nodes_one_torchrun_each_ranks_per_gpu_threads_per_rank(tmp_path):
    proc, call = sbatch(tmp_path, "+experiment=tiny", "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr
    assert call["args"][:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                "--cpus-per-task=32", "--kill-on-bad-exit=1"]
    # torchrun behind moetrain.torchrun (stop signals blocked for the ranks and relayed to them)
    assert call["args"][5:7] == ["bash", "-c"] and 'trap "" USR1 TERM' in call["args"][7]
    assert call["args"][8:12] == ["moetrain-launch", "python", "-m", "moetrain.torchrun"]
    # the first node's address (not its SLURM name), a port from the job id: 15000 + 4242
    assert torchrun_args(call) == [
        "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.1.0.7:19242", "-m", "moetrain.train",
        "+experiment=tiny", "parallel.tp=2", "run.dir=outputs/moe-4242",
    ]
    assert call["omp"] == "8"  # 32 CPUs of the node over 4 ranks
    assert "2 node(s) x 4 rank(s), 8 thread(s) per rank, rendezvous 10.1.0.7:19242" in proc.stdout


def test_a_given_run_dir_address_port_ranks_and_threads_are_kept(tmp_path):
    proc, call = sbatch(tmp_path, "+experiment=tiny", "run.dir=/shared/run", MASTER_PORT="6000",
                        MASTER_ADDR="head.example", GPUS_PER_NODE="8", OMP_NUM_THREADS="3")
    args = torchrun_args(call)
    assert "--rdzv_endpoint=head.example:6000" in args and "--nproc_per_node=8" in args
    assert [a for a in args if a.startswith("run.dir=")] == ["run.dir=/shared/run"]
    assert call["omp"] == "3"


def test_a_stale_preempted_marker_is_removed_before_the_ranks_start_and_requeues_nothing(tmp_path):
    """A run stopped early writes `preempted` and is requeued; when the next start-up dies before
    its rank 0 clears the marker, the marker stays. The run after that finishes (srun exits 0):
    the script must not take the old marker for this run's stop and requeue a finished job."""
    run = tmp_path / "run"
    run.mkdir()
    marker = run / "preempted"
    marker.write_text("step 4: received SIGUSR1\n")  # what moetrain.preemption writes
    proc, call = sbatch(tmp_path, "+experiment=tiny", f"run.dir={run}", FAKE_MARKER=str(marker))
    assert proc.returncode == 0, proc.stderr
    assert call["marker"] is False  # gone before the ranks start
    assert proc.stdout.splitlines()[-1] == "moetrain[job 4242]: finished", proc.stdout
    assert "requeued" not in proc.stdout and not (run / "requeues").exists(), proc.stdout


def test_outside_slurm_the_script_refuses_to_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH), "+experiment=tiny"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr
