"""Composition refuses a key the schema does not have, however it is written, in one line."""

import pytest

from moetrain.config import ConfigError, compose, to_object
from moetrain.train import run

TRAIN_KEYS = "valid keys of train: max_steps, global_batch_size"


def refused(*overrides: str, experiment: str = "+experiment=tiny") -> str:
    with pytest.raises(ConfigError) as err:
        to_object(compose([experiment, *overrides]))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override", ["train.max_step=5", "+train.max_step=5", "++train.max_step=5"])
def test_a_misspelt_key_is_refused_however_it_is_written(override):
    message = refused(override)
    assert message.startswith("unknown key 'train.max_step' (did you mean train.max_steps?)")
    assert TRAIN_KEYS in message


@pytest.mark.parametrize("override, key", [
    ("+trian.max_steps=5", "'trian' (did you mean train?)"),
    ("+model.moe.routing.top_q=0.5", "'model.moe.routing.top_q' (did you mean model.moe.routing.top_p?)"),
    ("++train.optim.lr=1", "'train.optim'"),
])
def test_new_keys_at_any_depth_are_refused(override, key):
    assert f"unknown key {key}" in refused(override)


def test_a_misspelt_key_in_a_yaml_group_names_the_key_and_the_file(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ntrain:\n  max_step: 5\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "typo.yaml").write_text("max_steps: 5\neval_evry: 2\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    message = refused(searchpath, experiment="+experiment=typo")
    assert message.startswith("unknown key 'train.max_step' in experiment/typo.yaml (did you mean")
    message = refused(searchpath, "train=typo")
    assert message.startswith("unknown key 'train.eval_evry' in train/typo.yaml (did you mean "
                              "train.eval_every?)")


def test_a_misspelt_key_in_a_list_of_sections_names_the_list_and_its_keys(tmp_path):
    # OmegaConf names a key inside a list element without its path.
    message = refused("data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl, text_feild: t}]")
    assert message == ("unknown key 'data.sources[].text_feild' (did you mean "
                       "data.sources[].text_field?); valid keys of data.sources[]: path, weight, "
                       "text_field, name")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("sources:\n  - path: a.jsonl\n    wieght: 1\n")
    message = refused(f"hydra.searchpath=[file://{tmp_path}]", "data=mine")
    assert message.startswith("unknown key 'data.sources[].wieght' in data/mine.yaml (did you mean "
                              "data.sources[].weight?)")


def test_wrong_types_and_missing_options_are_one_line_naming_the_key():
    assert refused("train.max_steps=many").startswith("train.max_steps: Value 'many'")
    assert "experiment/nope" in refused(experiment="+experiment=nope")
    assert refused("train.max_steps=???").startswith("train.max_steps: ")
    assert refused("data.corpus=${oc.env:MOETRAIN_UNSET_VARIABLE}").startswith("data.corpus: ")


def test_a_config_composed_by_hydra_main_is_checked_too(tmp_path):
    """`@hydra.main` composes before `run` sees the config: `run` refuses the key, exit code 2."""
    cfg = compose(["+experiment=tiny", "+train.max_step=5", "train.max_steps=1", "train.eval_every=0",
                   "train.global_batch_size=2", f"run.dir={tmp_path / 'run'}"])
    assert run(cfg) == 2
    assert not (tmp_path / "run").exists()
