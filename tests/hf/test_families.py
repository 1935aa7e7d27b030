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
    # transformers builds the main model only (DeepSeek-V3's and Kimi K2's MTP layer is not
    # instantiated; the experiments train one): the planner's main-model count
    assert count_parameters(cfg.model).n_main == n_hf


def test_imported_mtp_layer_computes_deepseek_v3s_formula(tmp_path):
    """A DeepSeek-V3 folder with its MTP layer (model.layers.<n>.*, written as released):
    moetrain's MTP logits against the formula computed from the folder's tensors by name -
    h' = eh_proj [enorm-normed Emb(t_{i+1}); hnorm-normed h^0] (h^0: transformers' main model
    before its final norm), transformers' own decoder layer n on h' (its MTP block, loaded by
    transformers from the folder), shared_head.norm, lm_head. A swapped or misread MTP tensor
    (which a round trip alone cannot see) changes them."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    hf = save_hf("deepseek_v3", tmp_path, mtp_layers=1)
    from moetrain.hf.config import folder_overrides, model_config_from

    cfg = model_config_from(folder_overrides(tmp_path))
    assert cfg.mtp.depth == 1
    model = Transformer(cfg).eval()
    assert load_hf_weights(model, tmp_path, cfg) == len(tensor_map(cfg))
    tokens = torch.randint(0, VOCAB, (2, 25), generator=torch.Generator().manual_seed(1))
    inputs, ahead = tokens[:, :-1], tokens[:, 1:].unsqueeze(-1)
    with torch.no_grad():
        ours = model(inputs, mtp_tokens=ahead)[1]

    n, eps = hf.config.num_hidden_layers, hf.config.rms_norm_eps
    t = load_file(str(tmp_path / "model.safetensors"))
    layer = f"model.layers.{n}."
    # transformers' model one layer deeper: its layer n is the MTP block, read from the folder
    deeper = AutoConfig.from_pretrained(str(tmp_path))
    deeper.num_hidden_layers = n + 1
    deeper._attn_implementation = "sdpa"
    block_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), config=deeper,
                                                       dtype=torch.float32).eval()
    block = block_model.model.layers[n]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    seen = {}
    hf.model.norm.register_forward_hook(lambda m, args, out: seen.update(h0=args[0]))
    with torch.no_grad():
        hf(inputs)
        emb = t["model.embed_tokens.weight"][tokens[:, 1:]]
        x = torch.cat([rms(emb, t[layer + "enorm.weight"]), rms(seen["h0"], t[layer + "hnorm.weight"])],
                      -1) @ t[layer + "eh_proj.weight"].T
        position_ids = torch.arange(inputs.shape[1]).expand(2, -1)
        cos_sin = block_model.model.rotary_emb(x, position_ids)
        out = block(x, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        h1 = out[0] if isinstance(out, tuple) else out
        want = rms(h1, t[layer + "shared_head.norm.weight"]) @ t["lm_head.weight"].T
    err = rel_err(ours, want)
    print(f"deepseek_v3 MTP logits max rel. error {err:.1e}")
    assert err < 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_an_olmoe_model_that_renormalises_exports_a_config_that_says_so(tmp_path):
    """OLMoE's transformers default is norm_topk_prob=false: a moetrain OLMoE model with
    norm_topk_prob=true must export it, so transformers computes the same logits (issue 29)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    original = save_hf("olmoe", tmp_path / "hf")  # norm_topk_prob=false
    cfg = moetrain_config(original)
    cfg.moe.norm_topk_prob = True
    model = Transformer(cfg).eval()
    load_hf_weights(model, tmp_path / "hf", cfg)
    out = tmp_path / "export"
    to_hf_config(cfg).save_pretrained(str(out))
    save_file(to_hf_state(model.state_dict(), cfg), str(out / "model.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert exported.config.norm_topk_prob is True
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        assert rel_err(ours, exported(tokens).logits) < 1e-5
        assert rel_err(ours, original(tokens).logits) > 1e-3  # the flag changes the logits
