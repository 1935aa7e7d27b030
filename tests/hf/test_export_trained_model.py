"""The export is the trained model (issue 22): a run with a bare tokenizer.json (no
tokenizer_config.json) and a top-k schedule exports with the run's EOS id in every file
transformers reads and the top-k its weights were trained with, so transformers' loss on the
validation set equals the validation loss moetrain logged for that checkpoint. Also: a Hugging
Face model's tokenizer is the only one its continued pretraining may use, unless the config says
otherwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetrain.config import compose, to_object, validate
from moetrain.hf.config import HFConfigError
from moetrain.runtime import init_runtime
from moetrain.trainer import Trainer
from tests.data.conftest import SHIPPED

# OLMoE-family tiny model; top_k 4 -> 3 -> 2 over steps 0, 1, 2: the checkpoint of step 2 holds
# the weights after the optimizer step at index 1, trained (and evaluated) with top_k 3.
RUN = ["+experiment=tiny", "model.family=olmoe", "model.qk_norm=full",
       "model.moe.first_dense_layers=0", "model.moe.norm_topk_prob=false", "model.vocab_size=512",
       "model.moe.schedule.top_k.kind=linear", "model.moe.schedule.top_k.start=4",
       "model.moe.schedule.top_k.end=2", "model.moe.schedule.top_k.end_step=2",
       "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
       "train.eval_every=2", "train.eval_batches=1", "train.dtype=fp32", "train.device=cpu",
       "checkpoint.every=2", "logging.progress=false", "data.seq_len=64"]


def _bare_tokenizer_json(folder: Path) -> Path:
    """A 300-token byte-level BPE saved as tokenizer.json alone: its EOS is found by name
    (<|endoftext|>), nothing next to it says so."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((SHIPPED / "hamlet.txt").read_text().split("\n\n"), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_trained")
    tokenizer = _bare_tokenizer_json(root / "tok")
    cfg = to_object(compose([*RUN, f"data.tokenizer.path={tokenizer}", f"run.dir={root / 'run'}"]))
    validate(cfg)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # as train.py
    trainer = Trainer(cfg, init_runtime(cfg), run_dir)
    trainer.fit()
    val_loss = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    return cfg, run_dir, val_loss


def test_the_export_has_the_runs_eos_and_trained_top_k_and_its_loss(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetrain.batches import batches
    from moetrain.hf.export import export

    cfg, run_dir, val_loss = run
    eos = _prepared(cfg)["tokenizer"]["eos_id"]  # what the run's data was made with
    out = tmp_path / "hf"
    export(run_dir, out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["num_experts_per_tok"] == 3  # not top_k_at(2) = 2: the model trained is the one exported
    assert config["eos_token_id"] == generation["eos_token_id"] == eos
    assert config.get("pad_token_id") is None and generation.get("pad_token_id") is None
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eos

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.generation_config.eos_token_id == eos
    rows = [r["ids"] for r in batches(cfg, run_dir, None, val=True)]
    ids = torch.tensor(rows)
    with torch.no_grad():
        logits = hf(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    print(f"transformers {loss:.7f} vs moetrain val_loss {val_loss:.7f}")
    assert math.isclose(loss, val_loss, rel_tol=1e-5)


def _prepared(cfg):
    from moetrain.data import ensure_prepared
    from moetrain.data.index import read_index

    return read_index(ensure_prepared(cfg.data, cfg.model.vocab_size))


def test_another_tokenizer_than_the_hugging_face_models_is_refused_unless_allowed(tmp_path):
    from moetrain.config.schema import DataConfig
    from moetrain.data import ensure_prepared
    from moetrain.data.index import tokenizer_source
    from moetrain.hf.load import use_hf_tokenizer
    from moetrain.hf.tokenizer import sentencepiece_to_hf
    from tests.hf.families import VOCAB, save_hf

    spm = tokenizer_source(ensure_prepared(DataConfig(), VOCAB))
    hf = tmp_path / "hf"
    save_hf("olmoe", hf)
    sentencepiece_to_hf(spm, hf)
    other = _bare_tokenizer_json(tmp_path / "other")

    def config(*overrides):
        return to_object(compose(["+experiment=tiny", f"model.init.from_hf={hf}", *overrides]))

    with pytest.raises(HFConfigError, match=rf"^data\.tokenizer\.path='{other}' is not the tokenizer "
                       rf"of model\.init\.from_hf='{hf}' \(\d+ of its 300 token ids map to other "
                       rf"text than in the model's {VOCAB}\).*allow_other_tokenizer=true"):
        use_hf_tokenizer(config(f"data.tokenizer.path={other}"))
    use_hf_tokenizer(config(f"data.tokenizer.path={other}", "model.init.allow_other_tokenizer=true"))
    # the folder's own (the default), or the sentencepiece model it was converted from: the same
    # pieces at the same ids
    cfg = config()
    use_hf_tokenizer(cfg)
    assert cfg.data.tokenizer.path == str(hf)
    use_hf_tokenizer(config(f"data.tokenizer.path={spm}"))
    # a model folder without a tokenizer, and none named: a new BPE would be trained
    (hf / "tokenizer.json").unlink()
    with pytest.raises(HFConfigError, match=r"has no tokenizer .* data\.tokenizer\.path is not set"):
        use_hf_tokenizer(config())
