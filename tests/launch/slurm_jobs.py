"""Submitting launch/slurm/train.sbatch to the test cluster and watching what its jobs do.

The cluster is the one scripts/slurm_cluster.sh starts (conftest.py's `slurm` fixture). Jobs run
on this machine, so a test can look at their processes (/proc) and files as they go.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Cluster:
    conf: Path  # slurm.conf of the test cluster
    jobcomp: Path  # one line per ended job (jobcomp/filetxt)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a user submits from: the venv's python first on PATH, no SLURM_*
        leaking in from outside, and no OMP_NUM_THREADS (the script derives it)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
        env.update(SLURM_CONF=str(self.conf), PYTHONUNBUFFERED="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc

    def submit(self, cwd: Path, sbatch_opts: list[str], args: list[str], **env: str) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_opts, str(SBATCH), *args],
                              cwd=cwd, env=self.env(**env), capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def jobs(self) -> dict[int, dict[str, str]]:
        """JobState, Restarts, ExitCode, RunTime of every job slurmctld knows."""
        out = self.run("scontrol", "show", "job", "-o", check=False).stdout
        jobs = {}
        for line in out.splitlines():
            found = dict(re.findall(r"\b(JobId|JobState|Restarts|ExitCode|RunTime)=(\S+)", line))
            if "JobId" in found:
                jobs[int(found["JobId"])] = found
        return jobs

    def completions(self, job_id: int) -> list[str]:
        """The JobState of each end of the job (a requeue ends a run too), in order."""
        if not self.jobcomp.exists():
            return []
        return re.findall(rf"^JobId={job_id} .*?\bJobState=(\S+)", self.jobcomp.read_text(),
                          flags=re.M)


def _processes(run_dir: Path, head: list[str]) -> list[int]:
    """Processes whose argv[1:] starts with `head` and passes run.dir=RUN_DIR."""
    want = f"run.dir={run_dir}"
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:1 + len(head)] == head and want in argv:
            pids.append(int(cmdline.parent.name))
    return pids


def rank_pids(run_dir: Path) -> list[int]:
    """The training ranks torchrun started (`python -u -m moetrain.train ...`)."""
    return _processes(run_dir, ["-u", "-m", "moetrain.train"])


def torchrun_pids(run_dir: Path, ready: bool = False) -> list[int]:
    """The job's `python -m moetrain.torchrun`; `ready`: only once it runs its signal relay (a
    second thread), i.e. has blocked the stop signals."""
    pids = _processes(run_dir, ["-m", "moetrain.torchrun"])
    if ready:
        pids = [p for p in pids if len(list(Path(f"/proc/{p}/task").glob("*"))) >= 2]
    return pids


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return recs


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a resume keeps its last value."""
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def last_step(run_dir: Path) -> int:
    recs = metrics(run_dir)
    return recs[-1]["step"] if recs else 0


@dataclass
class JobRecord:
    """What a test saw of one job, filled in while it runs."""
    name: str
    dir: Path
    job_id: int | None = None
    state: str = ""
    restarts: int = 0
    exit_code: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def output(self) -> str:
        files = sorted(self.dir.glob("slurm-*.out"))
        return "".join(f.read_text(errors="replace") for f in files)

    def rank_log(self, rank: int) -> str:
        path = self.run_dir / "logs" / f"rank{rank}.log"
        return path.read_text() if path.exists() else ""

    def describe(self) -> str:
        """Everything useful when an assertion fails."""
        logs = "".join(f"--- rank{r}.log\n{self.rank_log(r)}" for r in range(2))
        return (f"{self.name}: job {self.job_id} state={self.state} restarts={self.restarts} "
                f"exit={self.exit_code} notes={self.notes}\n--- SLURM output\n{self.output()}\n"
                f"{logs}")
