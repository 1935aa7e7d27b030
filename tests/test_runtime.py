"""The run directory: checked before anything is written, errors name run.dir."""

import pytest
import torch

from moetrain.config import ConfigError
from moetrain.runtime import Runtime, create_run_dir

ONE_CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), autocast_dtype=None)


def test_create_run_dir_writes_the_files_and_logs(tmp_path):
    run = tmp_path / "a" / "run"
    create_run_dir(run, ONE_CPU, {"config.yaml": "x: 1\n"})
    assert (run / "config.yaml").read_text() == "x: 1\n" and (run / "logs").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "logs"]  # no temp file left


def test_a_failed_write_names_run_dir_and_the_file(tmp_path):
    (tmp_path / "config.yaml").mkdir()  # in the way of the file
    with pytest.raises(ConfigError) as err:
        create_run_dir(tmp_path, ONE_CPU, {"config.yaml": "x: 1\n"})
    assert not (tmp_path / ".config.yaml.tmp").exists()
    assert str(err.value) == (f"run.dir='{tmp_path}' is unusable: cannot write "
                              f"{tmp_path / 'config.yaml'}: Is a directory")
