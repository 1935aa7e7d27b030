"""Tiny random Hugging Face models of every supported family, built locally from configs."""

from __future__ import annotations

from pathlib import Path

import torch

from moetrain.hf.config import hf_overrides, model_config_from

VOCAB = 512  # room for a sentencepiece vocabulary of the corpus (byte fallback)


def hf_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        return tf.MixtralConfig(**common, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_hidden_layers=3, num_key_value_heads=2, head_dim=12,
                                 intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                 num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0])
    if family == "olmoe":
        return tf.OlmoeConfig(**common, num_hidden_layers=2, num_key_value_heads=4,
                              intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                              norm_topk_prob=False)
    mla = dict(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=6, intermediate_size=40, moe_intermediate_size=12,
               n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1)
    if family == "deepseek_v2":  # V2-Lite's shape of attention: full-rank queries, YaRN
        return tf.DeepseekV2Config(
            **{**common, "max_position_embeddings": 640}, **mla, q_lora_rank=None, n_shared_experts=2, routed_scaling_factor=1.0,
            topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32.0,
                             "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
    assert family == "deepseek_v3"
    return tf.DeepseekV3Config(
        **common, **mla, q_lora_rank=12, n_shared_experts=1, routed_scaling_factor=2.5,
        n_group=4, topk_group=2, norm_topk_prob=True,
        num_nextn_predict_layers=0,  # transformers saves no MTP layer (save_hf writes one)
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


def build_hf(family: str, seed: int = 0):
    """A random fp32 Hugging Face model of `family`: norms and V3's expert biases away from
    their initial values, so a wrongly mapped one shows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            elif "e_score_correction_bias" in name:
                t.uniform_(-0.1, 0.1)
    return model


def save_hf(family: str, path: Path, seed: int = 0, mtp_layers: int = 0):
    """A random model of `family` saved to `path`; with `mtp_layers`, DeepSeek-V3's multi-token-
    prediction layers written after the main model's as its released checkpoint has them
    (transformers builds none): model.layers.<n_layers + k>.{enorm, hnorm, eh_proj,
    shared_head.norm, an MoE decoder layer, and copies of embed_tokens and lm_head as
    embed_tokens / shared_head.head}, config.json's num_nextn_predict_layers set."""
    model = build_hf(family, seed)
    model.save_pretrained(str(path))
    if mtp_layers:
        _add_mtp_layers(model, path, mtp_layers, seed)
    return model


def _add_mtp_layers(model, path: Path, count: int, seed: int) -> None:
    import json
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    assert model.config.model_type == "deepseek_v3"
    n = model.config.num_hidden_layers
    state = load_file(str(path / "model.safetensors"))
    deeper = hf_config("deepseek_v3")
    deeper.num_hidden_layers = n + count
    torch.manual_seed(seed + 1)
    donor = AutoModelForCausalLM.from_config(deeper, dtype=torch.float32)  # its extra layers
    with tempfile.TemporaryDirectory() as tmp:  # the tensors under their checkpoint names
        donor.save_pretrained(tmp)
        donated = load_file(str(Path(tmp) / "model.safetensors"))
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed + 2)
    for k in range(count):
        layer = f"model.layers.{n + k}."
        for name, t in donated.items():
            if name.startswith(layer):
                t = t.clone()
                if "norm" in name:
                    t.uniform_(0.5, 1.5, generator=g)
                elif "e_score_correction_bias" in name:
                    t.uniform_(-0.1, 0.1, generator=g)
                state[name] = t.contiguous()
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            state[f"{layer}{norm}.weight"] = torch.empty(d).uniform_(0.5, 1.5, generator=g)
        state[f"{layer}eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) * 0.05
        state[f"{layer}embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
        state[f"{layer}shared_head.head.weight"] = state["lm_head.weight"].clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["num_nextn_predict_layers"] = count
    (path / "config.json").write_text(json.dumps(config, indent=2))


def moetrain_config(hf_model):
    return model_config_from(hf_overrides(hf_model.config))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the agreement the family tests report."""
    return float((a - b).abs().max() / b.abs().max())
