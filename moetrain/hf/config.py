"""Hugging Face config <-> moetrain `model.*` keys, per family.

    hf_overrides(hf_config)          the model.* values that make moetrain the same model
    folder_overrides(dir)            the same for a folder (its MTP layers counted from its tensors)
    check_matches(model_cfg, dir)    [(key, ours, Hugging Face's)] that differ
    to_hf_config(model_cfg, ...)     the transformers config an export writes

The transformers config classes parse config.json (old and new key spellings alike:
`num_experts` / `num_local_experts`, `rope_theta` / `rope_parameters`), so this module reads
attributes of a parsed config, never raw JSON. A Hugging Face setting moetrain cannot compute
(sliding windows, attention biases, q/k/v clipping, layouts of dense and MoE layers other than
"the first k dense") raises `HFConfigError` naming the Hugging Face key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from moetrain.config.families import FAMILIES, MLA_FAMILIES
from moetrain.config.schema import head_dim_of
from moetrain.config.validate import ConfigError


class HFConfigError(ConfigError):
    """A Hugging Face config or folder moetrain cannot use; the message names the key."""


def require_transformers():
    """The transformers module, or HFConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in the dev and hf extras
        raise HFConfigError("Hugging Face import/export needs transformers: "
                            "pip install 'moetrain[hf]'") from None
    return transformers


def load_hf_config(path: str | Path):
    """The parsed config of a local Hugging Face folder (never the hub)."""
    transformers = require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFConfigError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise HFConfigError(f"{path / 'config.json'}: {str(err).splitlines()[0]}") from None


def _rope(hf: Any) -> dict[str, Any]:
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rp.get("rope_type", "default")
    out: dict[str, Any] = {"model.rope_theta": float(rp.get("rope_theta", 10000.0))}
    if kind == "default":
        out["model.rope_scaling.kind"] = "none"
        return out
    if kind != "yarn":
        raise HFConfigError(f"rope_parameters.rope_type={kind!r} is not supported (default, yarn)")
    if rp.get("attention_factor") is not None or rp.get("truncate", True) is not True:
        raise HFConfigError("rope_parameters.attention_factor / truncate are not supported "
                            "(moetrain derives the attention factor from mscale, truncated)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFConfigError("rope_parameters.partial_rotary_factor must be 1")
    factor = rp.get("factor") or hf.max_position_embeddings / rp["original_max_position_embeddings"]
    out.update({
        "model.rope_scaling.kind": "yarn",
        "model.rope_scaling.factor": float(factor),
        "model.rope_scaling.original_max_position_embeddings":
            int(rp["original_max_position_embeddings"]),
        "model.rope_scaling.beta_fast": float(rp.get("beta_fast") or 32),
        "model.rope_scaling.beta_slow": float(rp.get("beta_slow") or 1),
        "model.rope_scaling.mscale": float(rp.get("mscale") or 0.0),
        "model.rope_scaling.mscale_all_dim": float(rp.get("mscale_all_dim") or 0.0),
    })
    return out


def _refuse(hf: Any, key: str, ok: bool, valid: str) -> None:
    if not ok:
        raise HFConfigError(f"{key}={getattr(hf, key, None)!r} is not supported: {valid}")


def _trunk(hf: Any) -> dict[str, Any]:
    """Keys every family shares (embedding, depth, heads, norms, RoPE)."""
    _refuse(hf, "hidden_act", getattr(hf, "hidden_act", "silu") == "silu", "must be silu (SwiGLU)")
    _refuse(hf, "attention_bias", not getattr(hf, "attention_bias", False), "must be false")
    _refuse(hf, "mlp_bias", not getattr(hf, "mlp_bias", False), "must be false")
    _refuse(hf, "sliding_window", getattr(hf, "sliding_window", None) is None,
            "must be null (moetrain attends over the whole sequence)")
    return {
        "model.vocab_size": int(hf.vocab_size),
        "model.d_model": int(hf.hidden_size),
        "model.n_layers": int(hf.num_hidden_layers),
        "model.n_heads": int(hf.num_attention_heads),
        "model.n_kv_heads": int(hf.num_key_value_heads or hf.num_attention_heads),
        "model.norm_eps": float(hf.rms_norm_eps),
        "model.tie_embeddings": bool(getattr(hf, "tie_word_embeddings", False)),
        "model.max_position_embeddings": int(hf.max_position_embeddings),
        **_rope(hf),
    }


def _head_dim(hf: Any) -> Optional[int]:
    h = getattr(hf, "head_dim", None)
    return None if h is None or h == hf.hidden_size // hf.num_attention_heads else int(h)


def hf_overrides(hf: Any) -> dict[str, Any]:
    """The `model.*` values (dotted keys) of a Hugging Face MoE config of a supported family.

    Keys a family does not use keep their moetrain meaning and are not listed (e.g.
    model.ffn_hidden of a model without dense layers)."""
    family = hf.model_type
    if family not in FAMILIES:
        raise HFConfigError(f"model_type={family!r} is not a supported family "
                            f"({', '.join(FAMILIES)})")
    out = {"model.family": family, **_trunk(hf)}
    experts = [getattr(hf, k, None) for k in ("n_routed_experts", "num_local_experts", "num_experts")]
    out["model.moe.num_experts"] = int(next(e for e in experts if e))
    out["model.moe.top_k"] = int(hf.num_experts_per_tok)
    out["model.moe.routing.num_null_experts"] = 0
    out["model.moe.routing.top_p"] = None
    # DeepSeek-V3's multi-token-prediction layers (after the main model's); none elsewhere.
    mtp = int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if family == "deepseek_v3" else 0
    out["model.mtp.depth"] = mtp
    if mtp:
        out["model.mtp.block"] = "moe"
    if family in MLA_FAMILIES:
        out.update(_deepseek(hf))
        return out
    out["model.attention"] = "gqa"
    out["model.head_dim"] = _head_dim(hf)
    out["model.moe.score_func"] = "softmax"
    out["model.moe.num_shared_experts"] = 0
    out["model.moe.routed_scaling_factor"] = 1.0
    out["model.moe.routing.group_mode"] = "none"
    if family == "mixtral":
        out.update({"model.qk_norm": "none", "model.moe.expert_hidden": int(hf.intermediate_size),
                    "model.moe.norm_topk_prob": True, "model.moe.first_dense_layers": 0})
    elif family == "olmoe":
        _refuse(hf, "clip_qkv", hf.clip_qkv is None, "must be null")
        out.update({"model.qk_norm": "full", "model.moe.expert_hidden": int(hf.intermediate_size),
                    "model.moe.norm_topk_prob": bool(hf.norm_topk_prob),
                    "model.moe.first_dense_layers": 0})
    else:  # qwen3_moe
        dense = sorted(hf.mlp_only_layers or [])
        _refuse(hf, "mlp_only_layers", dense == list(range(len(dense))),
                "must list the first k layers (moetrain: model.moe.first_dense_layers = k)")
        _refuse(hf, "decoder_sparse_step", hf.decoder_sparse_step == 1, "must be 1")
        out.update({"model.qk_norm": "head", "model.moe.expert_hidden": int(hf.moe_intermediate_size),
                    "model.moe.norm_topk_prob": bool(hf.norm_topk_prob),
                    "model.moe.first_dense_layers": len(dense)})
        if dense:
            out["model.ffn_hidden"] = int(hf.intermediate_size)
    return out


def _deepseek(hf: Any) -> dict[str, Any]:
    v3 = hf.model_type == "deepseek_v3"
    _refuse(hf, "moe_layer_freq", getattr(hf, "moe_layer_freq", 1) == 1,
            "must be 1 (every layer after first_k_dense_replace is MoE)")
    out: dict[str, Any] = {
        "model.attention": "mla",
        "model.qk_norm": "none",
        "model.n_kv_heads": int(hf.num_attention_heads),
        "model.mla.q_lora_rank": None if hf.q_lora_rank is None else int(hf.q_lora_rank),
        "model.mla.kv_lora_rank": int(hf.kv_lora_rank),
        "model.mla.qk_nope_head_dim": int(hf.qk_nope_head_dim),
        "model.mla.qk_rope_head_dim": int(hf.qk_rope_head_dim),
        "model.mla.v_head_dim": int(hf.v_head_dim),
        "model.moe.expert_hidden": int(hf.moe_intermediate_size),
        "model.moe.num_shared_experts": int(hf.n_shared_experts or 0),
        "model.moe.first_dense_layers": int(hf.first_k_dense_replace),
        "model.moe.routed_scaling_factor": float(hf.routed_scaling_factor),
        "model.moe.score_func": "sigmoid" if v3 else "softmax",
    }
    if out["model.moe.num_shared_experts"]:
        out["model.moe.shared_expert_hidden"] = None
    if out["model.moe.first_dense_layers"]:
        out["model.ffn_hidden"] = int(hf.intermediate_size)
    groups = int(hf.n_group or 1)
    if v3:
        out["model.moe.norm_topk_prob"] = bool(hf.norm_topk_prob)
        limited = groups > 1
        score = "top2_sum"
    else:
        # transformers' DeepseekV2 never renormalises (DeepSeek's own code did, when set).
        _refuse(hf, "norm_topk_prob", not hf.norm_topk_prob,
                "must be false (transformers' DeepseekV2 ignores it; moetrain would differ)")
        out["model.moe.norm_topk_prob"] = False
        _refuse(hf, "topk_method", hf.topk_method in ("greedy", "group_limited_greedy"),
                "must be greedy or group_limited_greedy")
        limited = hf.topk_method == "group_limited_greedy" and groups > 1
        score = "max"
    out["model.moe.routing.group_mode"] = "limited" if limited else "none"
    if limited:
        out.update({"model.moe.routing.num_groups": groups,
                    "model.moe.routing.topk_groups": int(hf.topk_group),
                    "model.moe.routing.group_score": score})
    return out


def dense_overrides(hf: Any) -> dict[str, Any]:
    """The trunk keys of a dense Llama / Qwen3 config (upcycling) and its MLP width."""
    if hf.model_type not in ("llama", "qwen3"):
        raise HFConfigError(f"model_type={hf.model_type!r}: upcycling takes a dense llama or "
                            "qwen3 checkpoint")
    out = _trunk(hf)
    del out["model.max_position_embeddings"]  # a declaration, not part of the function
    out["model.head_dim"] = _head_dim(hf)
    out["model.qk_norm"] = "head" if hf.model_type == "qwen3" else "none"
    out["model.attention"] = "gqa"
    return out


def config_value(model_cfg: Any, key: str) -> Any:
    """The value of a dotted `model.*` key of a ModelConfig."""
    node = model_cfg
    for part in key.split(".")[1:]:
        node = getattr(node, part)
    return node.value if hasattr(node, "value") else node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def differences(model_cfg: Any, wanted: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, moetrain value, wanted value) for every key of `wanted` the config differs in.
    model.head_dim null and d_model / n_heads count as equal, so do
    model.moe.shared_expert_hidden null and model.moe.expert_hidden; fewer MTP modules
    (model.mtp.depth) than the checkpoint has is fine (the others are not trained)."""
    out = []
    for key, want in wanted.items():
        have = config_value(model_cfg, key)
        if key == "model.mtp.depth" and have <= want:
            continue
        if key == "model.mtp.block" and model_cfg.mtp.depth == 0:
            continue
        if key == "model.head_dim":
            have, want = head_dim_of(model_cfg), want or model_cfg.d_model // model_cfg.n_heads
        if key == "model.moe.shared_expert_hidden":  # null = model.moe.expert_hidden
            width = model_cfg.moe.expert_hidden
            have, want = have or width, want or wanted.get("model.moe.expert_hidden", width)
        if not _same(have, want):
            out.append((key, have, want))
    return out


def folder_overrides(path: str | Path) -> dict[str, Any]:
    """`hf_overrides` of a Hugging Face folder, with the multi-token-prediction layers it holds:
    DeepSeek-V3 configs declare num_nextn_predict_layers (transformers' default is 1) whether or
    not the folder has those layers' tensors (transformers saves none), so the tensors decide."""
    hf = load_hf_config(path)
    out = hf_overrides(hf)
    if out.get("model.mtp.depth"):
        names = _tensor_names(Path(path))
        n, depth = int(hf.num_hidden_layers), 0
        while f"model.layers.{n + depth}.eh_proj.weight" in names:
            depth += 1
        out["model.mtp.depth"] = min(depth, out["model.mtp.depth"])
        if not out["model.mtp.depth"]:
            del out["model.mtp.block"]
    return out


def _tensor_names(path: Path) -> set[str]:
    """The tensor names of a folder's safetensors (its index, or model.safetensors' header)."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return set()
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return set(f.keys())


def check_matches(model_cfg: Any, path: str | Path, key: str = "model.init.from_hf") -> None:
    """Refuse (HFConfigError naming every differing key and Hugging Face's value) a model
    config that is not the model of the Hugging Face folder `path`."""
    diffs = differences(model_cfg, folder_overrides(path))
    if diffs:
        listed = "; ".join(f"{k}={have!r} but the checkpoint has {want!r}" for k, have, want in diffs)
        raise HFConfigError(f"{key}={str(path)!r}: the model config differs from the checkpoint's: "
                            f"{listed} (python -m moetrain.hf overrides {path} prints them all)")


def format_overrides(values: dict[str, Any]) -> str:
    """Command-line overrides, one per line (Hydra syntax: null, true/false)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, float) else str(v)
    return "\n".join(f"{k}={fmt(v)}" for k, v in values.items())


def to_hf_config(model_cfg: Any, *, top_k: Optional[int] = None, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 dtype: str = "float32"):
    """The transformers config of a moetrain `ModelConfig` of a named family; the model's
    problems (config/families.py) must have been checked. `top_k`: the routing's k the weights
    were trained with last (a top_k schedule's value at that step). The special token ids are
    written as given, None included (the config classes' defaults, e.g. pad 1, would name real
    tokens of another vocabulary)."""
    transformers = require_transformers()
    m, moe = model_cfg, model_cfg.moe
    family = config_value(m, "model.family")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling.kind == "yarn":
        rs = m.rope_scaling
        rope = {"rope_type": "yarn", "rope_theta": float(m.rope_theta), "factor": float(rs.factor),
                "original_max_position_embeddings": int(rs.original_max_position_embeddings),
                "beta_fast": float(rs.beta_fast), "beta_slow": float(rs.beta_slow)}
        if rs.mscale:
            rope["mscale"] = float(rs.mscale)
        if rs.mscale_all_dim:
            rope["mscale_all_dim"] = float(rs.mscale_all_dim)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                  rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                  max_position_embeddings=m.max_position_embeddings, rope_parameters=rope,
                  num_experts_per_tok=top_k or moe.top_k, initializer_range=m.init_std,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, dtype=dtype)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, head_dim=head_dim_of(m),
                                          intermediate_size=moe.expert_hidden,
                                          num_local_experts=moe.num_experts)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=moe.expert_hidden,
                                        num_experts=moe.num_experts,
                                        norm_topk_prob=moe.norm_topk_prob)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, head_dim=head_dim_of(m), intermediate_size=m.ffn_hidden,
            moe_intermediate_size=moe.expert_hidden, num_experts=moe.num_experts,
            norm_topk_prob=moe.norm_topk_prob,
            mlp_only_layers=list(range(moe.first_dense_layers)), decoder_sparse_step=1)
    r = moe.routing
    limited = r.group_mode == "limited" and r.num_groups > 1
    ds = dict(**common, intermediate_size=m.ffn_hidden, moe_intermediate_size=moe.expert_hidden,
              n_routed_experts=moe.num_experts, n_shared_experts=moe.num_shared_experts,
              first_k_dense_replace=moe.first_dense_layers,
              routed_scaling_factor=moe.routed_scaling_factor, q_lora_rank=m.mla.q_lora_rank,
              kv_lora_rank=m.mla.kv_lora_rank, qk_nope_head_dim=m.mla.qk_nope_head_dim,
              qk_rope_head_dim=m.mla.qk_rope_head_dim, v_head_dim=m.mla.v_head_dim,
              n_group=r.num_groups if limited else 1, topk_group=r.topk_groups if limited else 1,
              norm_topk_prob=moe.norm_topk_prob)
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **ds, topk_method="group_limited_greedy" if limited else "greedy")
    # transformers keeps num_nextn_predict_layers as DeepSeek's config.json has it (its model
    # ignores those layers' tensors); moetrain's import reads them back.
    return transformers.DeepseekV3Config(**ds, rope_interleave=True,
                                         num_nextn_predict_layers=m.mtp.depth)


__all__ = ["HFConfigError", "check_matches", "config_value", "dense_overrides", "differences",
           "folder_overrides", "format_overrides", "hf_overrides", "load_hf_config",
           "require_transformers",
           "to_hf_config"]


def model_config_from(values: dict[str, Any], base: Any = None):
    """A `ModelConfig` (a copy of `base`, default the schema's) with dotted `model.*` values set."""
    import copy

    from moetrain.config.schema import ModelConfig

    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    for key, value in values.items():
        node, parts = cfg, key.split(".")[1:]
        for part in parts[:-1]:
            node = getattr(node, part)
        setattr(node, parts[-1], value)
    return cfg
