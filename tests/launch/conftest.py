"""The single-node SLURM cluster of scripts/slurm_cluster.sh, for the tests that need a real one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import CLUSTER_SCRIPT, Cluster


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def slurm() -> Cluster:
    """A running cluster: the one .ci/run started, else one started here (and stopped after);
    skips, saying why, where SLURM is not installed or cannot start."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: run scripts/slurm_cluster.sh install (Debian, root)")
    started_here = False
    if _script("status").returncode != 0:
        start = _script("start")
        if start.returncode != 0:
            why = (start.stderr.strip() or start.stdout.strip()).splitlines()[-1:]
            pytest.skip(f"the test SLURM cluster did not start: {' '.join(why)}")
        started_here = True
    conf = Path(re.search(r"SLURM_CONF=(\S+)", _script("env").stdout).group(1))
    jobcomp = re.search(r"^JobCompLoc=(\S+)", conf.read_text(), flags=re.M)
    yield Cluster(conf=conf, jobcomp=Path(jobcomp.group(1)) if jobcomp else Path(os.devnull))
    if started_here:
        _script("stop")
