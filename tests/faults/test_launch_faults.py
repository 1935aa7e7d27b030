"""Process faults under the project's launcher (launch/local.sh -> moetrain.torchrun), two gloo
ranks each (docs/faults.md): kill -9 of a rank, a SIGSTOPped rank, SIGTERM at random moments, a
refused config. Every job of this module is started at once and driven by one poll loop, so the
module takes about as long as its slowest job (the stopped rank: the watchdog's heartbeat
timeout, then a restart)."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.harness import SMALL, local_sh, start_train
from tests.launch.slurm_jobs import losses, rank_pids

pytestmark = pytest.mark.slow

MAX_STEPS = 16
# Over the harness's tiny run, at its SMALL size (two layers, one 32-token sequence per rank and
# step): the faults do not depend on it, and 10 ranks of 5 jobs share 2 cores, so cheaper steps
# leave the cores to the start-ups and the faults. Resumed as a relaunched job resumes.
OVERRIDES = [*SMALL, f"train.max_steps={MAX_STEPS}", "checkpoint.every=4",
             "checkpoint.resume=auto", "optim.decay=constant"]


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e for e in env if e.startswith(b"RANK=")]
    return int(found[0][5:]) if found else None


def latest(run_dir: Path) -> str:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


@dataclass
class Job:
    name: str
    dir: Path
    extra: list[str] = field(default_factory=list)
    act: Callable[["Job"], None] | None = None
    launches: int = 0
    proc: subprocess.Popen | None = None
    codes: list[int] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    relaunch: Callable[["Job"], bool] = lambda job: False

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def start(self) -> None:
        with (self.dir / f"launch{self.launches}.out").open("w") as out:
            self.proc = start_train([*OVERRIDES, *self.extra, f"run.dir={self.run_dir}"],
                                    launcher=local_sh(2), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.launches += 1
        self.notes[f"launch{self.launches}_at"] = time.monotonic()

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("launch*.out")))

    def log(self, rank: int) -> str:
        path = self.run_dir / "logs" / f"rank{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ranks(self) -> dict[int, int]:
        return {r: pid for pid in rank_pids(self.run_dir) if (r := rank_of(pid)) is not None}

    def describe(self) -> str:
        return (f"{self.name}: exit codes {self.codes}, notes {self.notes}\n--- output\n"
                f"{self.output()[-6000:]}\n--- rank0.log\n{self.log(0)[-4000:]}")


def kill_at(checkpoint: str, rank: int, key: str):
    """SIGKILL `rank` once `latest` names `checkpoint`."""
    def act(job: Job) -> None:
        ranks = job.ranks()
        if key not in job.notes and latest(job.run_dir) == checkpoint and rank in ranks:
            os.kill(ranks[rank], signal.SIGKILL)
            job.notes[key] = time.monotonic()
    return act


def both(*acts):
    def act(job):
        for a in acts:
            a(job)
    return act


def stop_rank_1_after_step_4(job: Job) -> None:
    if "stopped_at" not in job.notes:
        ranks = job.ranks()
        if latest(job.run_dir) == "step_4" and 1 in ranks:
            os.kill(ranks[1], signal.SIGSTOP)
            job.notes["stopped_at"] = time.monotonic()
            job.notes["stopped_pid"] = ranks[1]
    elif "named_after_s" not in job.notes and "hang detected" in job.log(0):
        job.notes["named_after_s"] = round(time.monotonic() - job.notes["stopped_at"], 1)


def sigterm_at_random_moments(seed: int, times: int):
    """SIGTERM to the launcher at a random moment of each of the first `times` launches
    (uniform over 2-30 s after the launch: start-up, steps and checkpoints alike). The first
    launch is stopped by its step_8 checkpoint at the latest: on a fast or idle machine the
    whole run can end before a late moment, and then nothing would be relaunched."""
    rng = random.Random(seed)
    delays = [rng.uniform(2, 30) for _ in range(times)]

    def act(job: Job) -> None:
        n = job.launches
        key = f"sigterm{n}"
        if n <= times and key not in job.notes and job.proc.poll() is None:
            late = n == 1 and latest(job.run_dir) == "step_8"
            if late or time.monotonic() - job.notes[f"launch{n}_at"] >= delays[n - 1]:
                os.kill(job.proc.pid, signal.SIGTERM)
                job.notes[key] = round(time.monotonic() - job.notes[f"launch{n}_at"], 1)
    return act


def cases(base: Path) -> list[Job]:
    def job(name, **kw):
        (base / name).mkdir()
        return Job(name, base / name, **kw)
    return [
        job("reference"),
        # rank 1 killed after the step 4 checkpoint; in the restarted group, rank 0 after step 8
        job("kill9", act=both(kill_at("step_4", 1, "killed_rank1_at"),
                              kill_at("step_8", 0, "killed_rank0_at"))),
        job("sigstop", extra=["fault.step_timeout=60"], act=stop_rank_1_after_step_4),
        job("sigterm", act=sigterm_at_random_moments(seed=23, times=3),
            relaunch=lambda j: j.launches < 4 and j.codes[-1] == 0
            and f"rank 0 exits at step {MAX_STEPS}" not in j.log(0)),
        job("refused", extra=["checkpoint.resume=/nonexistent/step_4"]),
    ]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict[str, Job]:
    jobs = {j.name: j for j in cases(tmp_path_factory.mktemp("launch_faults"))}
    start = time.monotonic()
    for j in jobs.values():
        j.start()
    running = set(jobs)
    deadline = start + 900
    try:
        while running and time.monotonic() < deadline:
            for name in sorted(running):
                j = jobs[name]
                code = j.proc.poll()
                if code is None:
                    if j.act is not None:
                        j.act(j)
                    continue
                j.codes.append(code)
                if j.relaunch(j):
                    j.start()
                else:
                    j.notes["ended_after_s"] = round(time.monotonic() - start, 1)
                    running.discard(name)
            time.sleep(0.2)
    finally:
        for name in running:
            os.killpg(jobs[name].proc.pid, signal.SIGKILL)
            jobs[name].notes["unfinished_at_deadline"] = True
        for j in jobs.values():  # a stopped rank that outlived its job
            pid = j.notes.get("stopped_pid")
            if pid and pid in rank_pids(j.run_dir):
                os.kill(pid, signal.SIGKILL)
    print(f"\nlaunch faults: {round(time.monotonic() - start, 1)} s; " + ", ".join(
        f"{j.name} {j.codes} after {j.notes.get('ended_after_s')} s" for j in jobs.values()))
    return jobs


def assert_exact(job: Job, ref: Job) -> None:
    got, want = losses(job.run_dir), losses(ref.run_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), job.describe()
    assert got == want, [(s, got[s], want.get(s)) for s in got if got[s] != want.get(s)]


def test_the_reference_runs_through(campaign):
    ref = campaign["reference"]
    assert ref.codes == [0], ref.describe()
    assert "restarting" not in ref.output(), ref.describe()


def test_kill_9_of_a_rank_then_of_rank_0_is_restarted_in_the_job_and_ends_exact(campaign):
    job = campaign["kill9"]
    assert job.codes == [0] and "killed_rank0_at" in job.notes, job.describe()
    out = job.output()
    assert "rank 1: exit code -9" in out and "rank 0: exit code -9" in out, job.describe()
    assert out.count("restarting it") == 2, job.describe()
    log = job.log(0)
    assert "resumed from" in log and "worker group restart 2" in log, job.describe()
    assert re.search(r"resumed from \S+step_4 at step 4", log), job.describe()
    assert re.search(r"resumed from \S+step_8 at step 8", log), job.describe()
    assert_exact(job, campaign["reference"])


def test_a_stopped_rank_is_named_within_two_minutes_and_the_job_recovers_exact(campaign):
    """fault.step_timeout=60 (the tight timeout of the issue), fault.heartbeat_timeout=30."""
    job = campaign["sigstop"]
    assert job.codes == [0], job.describe()
    # by its stopped heartbeat (30 s), before the 90%-of-step_timeout limit (54 s) would act
    assert job.notes.get("named_after_s", 1e9) < 0.9 * 60, job.describe()
    line = next(x for x in job.log(0).splitlines() if "hang detected" in x)
    pid = job.notes["stopped_pid"]
    assert re.search(rf"ranks not arriving: rank 1 \(\S+, pid {pid}: no heartbeat for \d+ s", line), line
    assert "--- Python stacks of rank 0" in job.log(0), job.describe()
    assert "exit code 75" in job.output() and "restarting it" in job.output(), job.describe()
    assert_exact(job, campaign["reference"])


def test_sigterm_at_random_moments_saves_and_relaunches_end_exact(campaign):
    job = campaign["sigterm"]
    assert job.codes == [0] * len(job.codes) and len(job.codes) >= 2, job.describe()
    assert [k for k in job.notes if k.startswith("sigterm")], job.describe()
    assert "restarting it" not in job.output(), job.describe()  # a clean stop is not a failure
    assert_exact(job, campaign["reference"])


def test_a_refused_start_is_not_restarted(campaign):
    job = campaign["refused"]
    assert job.codes == [2], job.describe()
    # the ranks' one line, once (moetrain.torchrun adds nothing to a refusal: not restarted)
    (line,) = job.output().splitlines()
    assert line.startswith("error: checkpoint.resume='/nonexistent/step_4'"), job.describe()
