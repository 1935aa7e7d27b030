"""python -m moetrain.hf: overrides that reproduce an HF config, exports refused with the
feature named and nothing written, and the sentencepiece -> HF tokenizer conversion giving the
same ids on the corpus."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import CheckpointManager, TrainState
from moetrain.config import compose, to_object
from moetrain.config.schema import DataConfig
from moetrain.data import ensure_prepared, load_prepared_tokenizer, resolve_sources
from moetrain.data.index import tokenizer_source
from moetrain.hf.__main__ import main
from moetrain.hf.config import differences, hf_overrides, load_hf_config
from moetrain.hf.tokenizer import load_hf_tokenizer, sentencepiece_to_hf
from moetrain.model import Transformer
from tests.harness import tiny_config
from tests.hf.families import save_hf


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_overrides_reproduce_the_hf_config(family, tmp_path, capsys):
    save_hf(family, tmp_path)
    assert main(["overrides", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"model.family={family}" in lines
    cfg = tiny_config(lines)
    assert differences(cfg.model, hf_overrides(load_hf_config(tmp_path))) == []


def _run(tmp_path: Path, *overrides: str, bias: float = 0.0) -> Path:
    """A run directory with config.yaml and a step_1 checkpoint of a tiny model."""
    cfg = tiny_config(overrides)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        model.layers["1"].moe.router.expert_bias.fill_(bias)
    CheckpointManager(run, None).save(model, torch.optim.AdamW(model.parameters()),
                                      TrainState(step=1), meta={"tokenizer": "/nonexistent"})
    return run


def test_exports_that_cannot_be_exact_are_refused_naming_the_feature(tmp_path, capsys):
    out = tmp_path / "hf"
    run = _run(tmp_path, "model.moe.first_dense_layers=0")
    tok = tokenizer_source(ensure_prepared(DataConfig(), 8192))

    def refused(*args):
        assert main(["export", str(run), str(out), *args]) == 2
        assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))  # nothing written
        return capsys.readouterr().err

    assert "model.family=custom" in refused("--tokenizer", str(tok))
    assert "model.qk_norm" in refused("--family", "qwen3_moe", "--tokenizer", str(tok))
    assert "--tokenizer" in refused("--family", "mixtral")  # the recorded one does not exist
    err = refused("--family", "deepseek_v3", "--tokenizer", str(tok))
    assert "model.attention must be mla" in err and "model.moe.score_func must be sigmoid" in err
    # the tiny model is a Mixtral without dense layers: exported, with the bias at zero
    assert main(["export", str(run), str(out), "--family", "mixtral", "--tokenizer", str(tok)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("e_score_correction_bias" in n for n in names)  # a family without a bias
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in names
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # every file as the umask says (safetensors alone writes 0600)
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def test_a_non_zero_expert_bias_is_refused_by_a_family_without_one(tmp_path, capsys):
    run = _run(tmp_path, "model.moe.first_dense_layers=0", "model.family=mixtral", bias=0.1)
    tok = tokenizer_source(ensure_prepared(DataConfig(), 8192))
    assert main(["export", str(run), str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err
    assert "expert_bias is non-zero" in err and "model.moe.routing.bias_rate" in err


def test_the_converted_tokenizer_encodes_the_corpus_as_sentencepiece(tmp_path):
    prepared = ensure_prepared(DataConfig(), 8192)
    spm = load_prepared_tokenizer(prepared)
    sentencepiece_to_hf(spm.model_file, tmp_path)
    hf = load_hf_tokenizer(tmp_path)
    text = _first_corpus_file().read_text()[:200_000] + " \t\n  ünïcödé ☃ 😀 12345"
    ids = spm.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == spm.decode(ids) == text
    assert (hf.eos_token_id, hf.bos_token_id) == (spm.eos_id, spm.bos_id)


def _first_corpus_file() -> Path:
    (source,) = resolve_sources(DataConfig())  # the shipped corpus
    _, files = source.resolve()
    return files[0].path


def test_an_imported_models_tokenizer_prepares_the_data(tmp_path):
    """The prepared data of a run with model.init.from_hf uses the folder's tokenizer.json
    (`use_hf_tokenizer` points data.tokenizer.path there); another vocabulary is another
    prepared dataset."""
    from moetrain.data import PackedTokenDataset
    from moetrain.data.index import read_index
    from moetrain.hf.load import use_hf_tokenizer

    default = ensure_prepared(DataConfig(), 8192)
    save_hf("mixtral", tmp_path)  # a model folder (config.json) with a tokenizer
    sentencepiece_to_hf(load_prepared_tokenizer(default).model_file, tmp_path)
    # not a trainable config (no model.family): composed, not validated
    cfg = to_object(compose(["+experiment=tiny", "model.vocab_size=9000",  # padded embedding
                             f"model.init.from_hf={tmp_path}"]))
    use_hf_tokenizer(cfg)
    assert cfg.data.tokenizer.path == str(tmp_path)
    prepared = ensure_prepared(cfg.data, 9000)
    assert read_index(prepared)["tokenizer"]["file"] == "tokenizer.json" and prepared != default
    tok = load_prepared_tokenizer(prepared)
    assert tok.kind != load_prepared_tokenizer(default).kind and tok.vocab_size == 8192
    (source,) = resolve_sources(cfg.data)
    first = PackedTokenDataset(prepared, "train", 64, source.name).get_batch([0])[0].tolist()
    assert first == tok.encode(_first_corpus_file().read_text())[:len(first)]  # doc 0 first
