"""Which moetrain model configs each Hugging Face family can express (torch-free).

`model.family` names the architecture a config is; `family_problems` lists every key whose
value that family cannot express, so a config is refused before training (config/validate.py)
and before an export (moetrain/hf), never exported approximately. Training-time policies that
leave the model's function unchanged (capacity dropping, token rounding, aux and z losses, the
bias *update* rate of DeepSeek-V3) are not features of the architecture and are not checked.
docs/families.md has the table.
"""

from __future__ import annotations

from typing import Any

#: model.family -> Hugging Face `model_type` (the same names).
FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")


def family_problems(model: Any) -> list[tuple[str, str]]:
    """(key, why) for every value of the `ModelConfig` that `model.family` cannot express;
    empty for family custom."""
    family, moe, r = model.family, model.moe, model.moe.routing
    if family == "custom":
        return []
    problems: list[tuple[str, str]] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append((key, why))

    mla = family in MLA_FAMILIES
    need(model.attention == ("mla" if mla else "gqa"), "model.attention",
         f"must be {'mla' if mla else 'gqa'}")
    qk = {"mixtral": "none", "qwen3_moe": "head", "olmoe": "full"}.get(family, "none")
    need(model.qk_norm == qk, "model.qk_norm", f"must be {qk}")
    if family == "olmoe":
        need(model.head_dim in (None, model.d_model // model.n_heads), "model.head_dim",
             "must be null (d_model / n_heads): OLMoE's q/k norm spans d_model")
    need(r.top_p is None, "model.moe.routing.top_p", "must be null (top-k routing only)")
    need(r.num_null_experts == 0, "model.moe.routing.num_null_experts", "must be 0")
    need(r.group_mode != "balanced", "model.moe.routing.group_mode", "cannot be balanced")
    need(not moe.shared_expert_gate, "model.moe.shared_expert_gate", "must be false")
    need(moe.score_func == ("sigmoid" if family == "deepseek_v3" else "softmax"),
         "model.moe.score_func", f"must be {'sigmoid' if family == 'deepseek_v3' else 'softmax'}")
    if family == "mixtral":
        need(moe.norm_topk_prob, "model.moe.norm_topk_prob", "must be true (Mixtral renormalises)")
    if family == "deepseek_v2":
        need(not moe.norm_topk_prob, "model.moe.norm_topk_prob",
             "must be false (transformers' DeepseekV2 never renormalises)")
    if family != "deepseek_v3":
        need(r.bias_rate == 0, "model.moe.routing.bias_rate",
             "must be 0 (the family has no expert bias; deepseek_v3 has)")
    if not mla:
        need(moe.routed_scaling_factor == 1.0, "model.moe.routed_scaling_factor", "must be 1")
        need(r.group_mode == "none" or r.num_groups == 1, "model.moe.routing.group_mode",
             "must be none (no group-limited routing)")
        need(moe.num_shared_experts == 0, "model.moe.num_shared_experts", "must be 0")
    else:
        if r.group_mode == "limited":
            score = "max" if family == "deepseek_v2" else "top2_sum"
            need(r.group_score == score, "model.moe.routing.group_score", f"must be {score}")
        need(moe.shared_expert_hidden in (None, moe.expert_hidden),
             "model.moe.shared_expert_hidden",
             "must be null or model.moe.expert_hidden (shared width = n_shared x expert width)")
    if family in ("mixtral", "olmoe"):
        need(moe.first_dense_layers == 0, "model.moe.first_dense_layers",
             "must be 0 (every layer is MoE)")
    if family == "deepseek_v3":
        # The checkpoint's MTP layer model.layers.<n_layers + k> is one of its MoE layers.
        need(model.mtp.depth == 0 or model.mtp.block == "moe", "model.mtp.block",
             "must be moe (the MTP layer is an MoE layer)")
    else:
        need(model.mtp.depth == 0, "model.mtp.depth",
             "must be 0 (no multi-token-prediction layer; deepseek_v3 has one)")
    return [(key, f"{why} in the {family} family (model.family={family})")
            for key, why in problems]


__all__ = ["FAMILIES", "MLA_FAMILIES", "family_problems"]
