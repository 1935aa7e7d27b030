"""Each family against transformers: a tiny random Hugging Face model imported into moetrain
computes the same fp32 logits (rel. 1e-5), its tensors come back bit-exact, and the parameter
count equals transformers' - for the tiny models and for the shipped full-size configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moetrain.config import compose, to_object, validate
from moetrain.config.families import FAMILIES
from moetrain.hf.config import differences, hf_overrides, to_hf_config
from moetrain.hf.load import load_hf_weights
from moetrain.hf.tensors import tensor_map, to_hf_state
from moetrain.model import Transformer
from moetrain.planning import count_parameters
from tests.hf.families import VOCAB, moetrain_config, rel_err, save_hf

SHIPPED = {"mixtral": "mixtral_8x7b", "qwen3_moe": "qwen3_30b_a3b", "olmoe": "olmoe_1b_7b",
           "deepseek_v2": "deepseek_v2_lite"}


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_computes_transformers_logits_and_round_trips(family, tmp_path):
    hf = save_hf(family, tmp_path)
    cfg = moetrain_config(hf)
    model = Transformer(cfg).eval()
    assert load_hf_weights(model, tmp_path, cfg) == len(tensor_map(cfg))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    err = rel_err(ours, theirs)
    print(f"{family}: logits max rel. error {err:.1e}, "
          f"{sum(p.numel() for p in hf.parameters())} parameters")
    assert err < 1e-5
    assert count_parameters(cfg).n_total == sum(p.numel() for p in hf.parameters())
    # HF -> moetrain -> HF: every tensor bit-exact, none missing, none added
    original = load_file(str(tmp_path / "model.safetensors"))
    back = to_hf_state(model.state_dict(), cfg)
    assert back.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(back[name], t), name


# The frontier shapes (docs/planning.md): Kimi K2 is transformers' DeepseekV3ForCausalLM.
FRONTIER = {"deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
            "qwen3_235b_a22b": "qwen3_moe"}


@pytest.mark.parametrize("family, experiment",
                         [*SHIPPED.items(), *((f, e) for e, f in FRONTIER.items())],
                         ids=[*SHIPPED.values(), *FRONTIER])
def test_shipped_config_is_the_family_model_with_its_parameter_count(family, experiment):
    """The full-size config: transformers' model of the config we would export has exactly the
    planner's parameter count (built on the meta device), and reads back as the same config."""
    from transformers import AutoModelForCausalLM

    cfg = to_object(compose([f"+experiment={experiment}"]))
    validate(cfg)
    hf_cfg = to_hf_config(cfg.model)
    assert hf_cfg.model_type == family
    assert differences(cfg.model, hf_overrides(hf_cfg)) == []
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    n_hf = sum(p.numel() for p in hf.parameters())
    print(f"{family}: {n_hf:,} parameters")
    assert count_parameters(cfg.model).n_total == n_hf
