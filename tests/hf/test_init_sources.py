"""Starting from Hugging Face checkpoints: upcycling a dense Llama / Qwen3 model (the first
forward of the MoE equals the dense model), and the refusals that name the right key: a model
config differing from the checkpoint's, a trunk differing from the dense model's, a folder that
is no checkpoint at all (model.init.upcycle_from, not checkpoint.resume), all before a run
directory exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.config import ConfigError
from moetrain.hf.config import HFConfigError, check_matches, dense_overrides, model_config_from
from moetrain.hf.load import check_init, dense_config, read_dense_state
from moetrain.model import Transformer
from moetrain.model.upcycle import upcycle_
from tests.harness import run_train, tiny_config
from tests.hf.families import VOCAB, rel_err, save_hf


def save_dense(kind: str, path: Path):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)
    cfg = tf.LlamaConfig(**common) if kind == "llama" else tf.Qwen3Config(**common)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_upcycled_moe_first_forward_equals_the_dense_hf_model(kind, tmp_path):
    from transformers import AutoConfig

    dense = save_dense(kind, tmp_path)
    trunk = dense_overrides(AutoConfig.from_pretrained(str(tmp_path)))
    cfg = model_config_from({**trunk, "model.moe.num_experts": 4, "model.moe.top_k": 2,
                             "model.moe.expert_hidden": 48, "model.moe.first_dense_layers": 1,
                             "model.ffn_hidden": 48})
    dense_cfg, family = dense_config(cfg, tmp_path)
    torch.manual_seed(1)
    moe = Transformer(cfg).eval()
    upcycle_(moe, read_dense_state(tmp_path, dense_cfg, family))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = rel_err(moe(tokens), dense(tokens).logits)
    print(f"upcycled from {kind}: first-forward max rel. error {err:.1e}")
    assert err < 1e-5


def test_a_differing_trunk_or_model_config_is_refused_naming_each_key(tmp_path):
    save_dense("qwen3", tmp_path / "dense")
    cfg = tiny_config([f"model.init.upcycle_from={tmp_path / 'dense'}"])
    with pytest.raises(HFConfigError) as err:
        check_init(cfg)
    msg = str(err.value)
    assert msg.startswith("model.init.upcycle_from=")
    assert "model.d_model=128 but the dense checkpoint has 32" in msg
    assert "model.qk_norm='none' but the dense checkpoint has 'head'" in msg

    hf = save_hf("qwen3_moe", tmp_path / "moe")
    cfg = tiny_config(["model.family=qwen3_moe", "model.qk_norm=head",
                       "model.moe.first_dense_layers=1"])
    with pytest.raises(HFConfigError) as err:
        check_matches(cfg.model, tmp_path / "moe")
    msg = str(err.value)
    assert f"model.vocab_size=8192 but the checkpoint has {VOCAB}" in msg
    assert f"model.moe.expert_hidden=192 but the checkpoint has {hf.config.moe_intermediate_size}" in msg
    assert "model.norm_eps" not in msg  # only the keys that differ (both 1e-6)
    assert isinstance(err.value, ConfigError)


def test_the_command_line_refuses_before_making_the_run_directory(tmp_path):
    save_hf("qwen3_moe", tmp_path / "moe")
    run = tmp_path / "run"
    done = run_train([f"model.init.from_hf={tmp_path / 'moe'}", "model.family=qwen3_moe",
                      "model.qk_norm=head", f"run.dir={run}"])
    assert done.returncode == 2, done.stderr
    assert "model.init.from_hf=" in done.stderr and "model.d_model=128 but the checkpoint has 32" \
        in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_train([f"model.init.upcycle_from={tmp_path / 'empty'}", f"run.dir={run}"])
    assert done.returncode == 2, done.stderr
    assert "model.init.upcycle_from=" in done.stderr and "checkpoint.resume" not in done.stderr
    assert not run.exists()
