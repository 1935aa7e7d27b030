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


@pytest.mark.parametrize("dtype, autocast", [("bf16", torch.bfloat16), ("fp32", None), ("auto", None)])
def test_train_dtype_sets_the_autocast_precision(dtype, autocast, monkeypatch):
    """train.dtype=bf16 computes under bf16 autocast, also on a CPU; auto is fp32 on a CPU."""
    from moetrain.config import compose, to_object
    from moetrain.runtime import init_runtime

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = to_object(compose(["+experiment=tiny", "train.device=cpu", f"train.dtype={dtype}"]))
    with torch.random.fork_rng():  # init_runtime seeds the process
        assert init_runtime(cfg).autocast_dtype == autocast
