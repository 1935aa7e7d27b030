"""Which Hugging Face tensor each moetrain tensor is, per family, and reading any slice of it.

    tensor_map(model_cfg, family)   {moetrain name: Source}   (parameters and persistent buffers)
    to_hf_state(state, model_cfg)   full moetrain tensors -> Hugging Face tensors (export)
    read_slice(source, files, offset, shape)   one region of a moetrain tensor from safetensors

Names (N a layer, e an expert; Mixtral's MoE is `block_sparse_moe` with experts w1/w3/w2,
the others' `mlp` with gate/up/down_proj and the router `mlp.gate`):

    tok_embeddings / norm / output          model.embed_tokens / model.norm / lm_head
    layers.N.attention_norm, ffn_norm       model.layers.N.input_layernorm, post_attention_layernorm
    attention.w{q,k,v,o}, q_norm, k_norm    self_attn.{q,k,v,o}_proj, q_norm, k_norm
    attention (MLA) wq | wq_a, q_a_norm, wq_b   self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj
                    wkv_a, wk_rope          self_attn.kv_a_proj_with_mqa rows [0, r) and [r, r + rope)
                    kv_a_norm, wkv_b, wo    self_attn.kv_a_layernorm, kv_b_proj, o_proj
    mlp.w{1,3,2}                            mlp.{gate,up,down}_proj
    moe.router.weight, expert_bias          <moe>.gate.weight, <moe>.gate.e_score_correction_bias (V3)
    moe.experts.w1[e] [D, F]                <moe>.experts.e.{gate_proj|w1}.weight [F, D] (transposed)
    moe.experts.w3[e], w2[e] [F, D]         ... {up_proj|w3}, {down_proj|w2} [D, F]
    moe.shared_experts.w{1,3,2}             mlp.shared_experts.{gate,up,down}_proj (DeepSeek)

DeepSeek-V3's multi-token-prediction layer k is `model.layers.<n_layers + k>` (k from 0):

    mtp.k.enorm / hnorm / eh_proj / norm    model.layers.M.enorm / hnorm / eh_proj / shared_head.norm
    mtp.k.block.*                           model.layers.M.* as any MoE layer (input_layernorm, ...)
    (the shared embedding and head)         model.layers.M.embed_tokens / shared_head.head: copies
                                            of model.embed_tokens / lm_head (`shared_copies`)

DeepSeek checkpoints pair rotary dimensions (2i, 2i+1); moetrain rotates halves (i, i + d/2).
Their rotary rows are permuted on the way in (HF row 2i -> i, 2i+1 -> d/2 + i) and back on the
way out: attention scores are unchanged (q and k are permuted alike) and the round trip is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from moetrain.config.families import MLA_FAMILIES


@dataclass(frozen=True)
class Source:
    """Where a moetrain tensor lives in a Hugging Face checkpoint.

    kind "same": the Hugging Face tensor `hf`, same shape. "rows": moetrain row i is row
    `rows[i]` of `hf` (which has `hf_rows` rows: slices, permutations, concatenations).
    "experts": stacked [E, A, B] from the per-expert [B, A] tensors `hf.format(e=e)`."""

    kind: str
    hf: str
    rows: Optional[tuple[int, ...]] = None
    hf_rows: int = 0


def _rope_rows(offset: int, d_rope: int) -> list[int]:
    half = d_rope // 2
    return [offset + (2 * j if j < half else 2 * (j - half) + 1) for j in range(d_rope)]


def _mla(m: Any, p: str, family: str) -> dict[str, Source]:
    mla, H = m.mla, m.n_heads
    q_h, r, rope = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.kv_lora_rank, mla.qk_rope_head_dim
    permute = family in MLA_FAMILIES  # both DeepSeek families pair rotary dimensions
    q_rows: list[int] = []
    for h in range(H):
        base = h * q_h
        q_rows += list(range(base, base + mla.qk_nope_head_dim))
        q_rows += (_rope_rows(base + mla.qk_nope_head_dim, rope) if permute
                   else list(range(base + mla.qk_nope_head_dim, base + q_h)))
    out = {}
    q_name = "q_proj" if mla.q_lora_rank is None else "q_b_proj"
    out["wq" if mla.q_lora_rank is None else "wq_b"] = Source("rows", f"{p}.{q_name}.weight",
                                                             tuple(q_rows), H * q_h)
    if mla.q_lora_rank is not None:
        out["wq_a"] = Source("same", f"{p}.q_a_proj.weight")
        out["q_a_norm"] = Source("same", f"{p}.q_a_layernorm.weight")
    kv_a = f"{p}.kv_a_proj_with_mqa.weight"
    out["wkv_a"] = Source("rows", kv_a, tuple(range(r)), r + rope)
    out["wk_rope"] = Source("rows", kv_a, tuple(_rope_rows(r, rope) if permute
                                                else range(r, r + rope)), r + rope)
    out["kv_a_norm"] = Source("same", f"{p}.kv_a_layernorm.weight")
    out["wkv_b"] = Source("same", f"{p}.kv_b_proj.weight")
    out["wo"] = Source("same", f"{p}.o_proj.weight")
    return {f"attention.{k}.weight": v for k, v in out.items()}


def tensor_map(m: Any, family: Optional[str] = None) -> dict[str, Source]:
    """{moetrain name: Source} of a `ModelConfig` as a checkpoint of `family` (default
    model.family; "llama" / "qwen3" for a dense model of the same trunk)."""
    family = str(family or m.family)
    moe = m.moe
    out: dict[str, Source] = {"tok_embeddings.weight": Source("same", "model.embed_tokens.weight"),
                              "norm.weight": Source("same", "model.norm.weight")}
    if not m.tie_embeddings:
        out["output.weight"] = Source("same", "lm_head.weight")
    for n in range(m.n_layers):
        out.update(_block(m, family, f"layers.{n}", f"model.layers.{n}",
                          dense=n < moe.first_dense_layers))
    for k in range(m.mtp.depth):  # DeepSeek-V3's MTP layers follow the main model's
        ours, hf = f"mtp.{k}", f"model.layers.{m.n_layers + k}"
        for ours_w, hf_w in (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                             ("norm", "shared_head.norm")):
            out[f"{ours}.{ours_w}.weight"] = Source("same", f"{hf}.{hf_w}.weight")
        out.update(_block(m, family, f"{ours}.block", hf, dense=m.mtp.block == "dense"))
    return out


def shared_copies(m: Any) -> dict[str, str]:
    """{Hugging Face name: moetrain name} of the tensors a checkpoint stores again for its MTP
    layers (DeepSeek-V3 keeps the shared embedding and output head in each): moetrain holds one
    of each, written to every copy on export and checked equal to the main one on import."""
    out = {}
    head = "tok_embeddings.weight" if m.tie_embeddings else "output.weight"
    for k in range(m.mtp.depth):
        hf = f"model.layers.{m.n_layers + k}"
        out[f"{hf}.embed_tokens.weight"] = "tok_embeddings.weight"
        out[f"{hf}.shared_head.head.weight"] = head
    return out


def _block(m: Any, family: str, ours: str, hf: str, dense: bool) -> dict[str, Source]:
    """One transformer block's tensors: moetrain prefix `ours`, Hugging Face prefix `hf`."""
    moe, out = m.moe, {}
    mixtral = family == "mixtral"
    block, (g, u, d) = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else (
        "mlp", ("gate_proj", "up_proj", "down_proj"))
    out[f"{ours}.attention_norm.weight"] = Source("same", f"{hf}.input_layernorm.weight")
    out[f"{ours}.ffn_norm.weight"] = Source("same", f"{hf}.post_attention_layernorm.weight")
    if m.attention == "mla":
        for k, v in _mla(m, f"{hf}.self_attn", family).items():
            out[f"{ours}.{k}"] = v
    else:
        for w in "qkvo":
            out[f"{ours}.attention.w{w}.weight"] = Source("same", f"{hf}.self_attn.{w}_proj.weight")
        if m.qk_norm != "none":
            for w in "qk":
                out[f"{ours}.attention.{w}_norm.weight"] = Source(
                    "same", f"{hf}.self_attn.{w}_norm.weight")
    if dense:
        for ours_w, hf_w in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{ours}.mlp.{ours_w}.weight"] = Source("same", f"{hf}.mlp.{hf_w}.weight")
        return out
    out[f"{ours}.moe.router.weight"] = Source("same", f"{hf}.{block}.gate.weight")
    if family == "deepseek_v3":
        out[f"{ours}.moe.router.expert_bias"] = Source(
            "same", f"{hf}.mlp.gate.e_score_correction_bias")
    for ours_w, hf_w in (("w1", g), ("w3", u), ("w2", d)):
        out[f"{ours}.moe.experts.{ours_w}"] = Source(
            "experts", f"{hf}.{block}.experts.{{e}}.{hf_w}.weight")
    if moe.num_shared_experts:
        for ours_w, hf_w in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{ours}.moe.shared_experts.{ours_w}.weight"] = Source(
                "same", f"{hf}.mlp.shared_experts.{hf_w}.weight")
    return out


def hf_names(m: Any, family: Optional[str] = None) -> set[str]:
    """Every Hugging Face tensor name the model's checkpoint holds."""
    names: set[str] = set(shared_copies(m))
    for src in tensor_map(m, family).values():
        if src.kind == "experts":
            names.update(src.hf.format(e=e) for e in range(m.moe.num_experts))
        else:
            names.add(src.hf)
    return names


@torch.no_grad()
def to_hf_state(state: dict[str, torch.Tensor], m: Any) -> dict[str, torch.Tensor]:
    """Full moetrain tensors (every key of `tensor_map`) -> Hugging Face tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, src in tensor_map(m).items():
        t = state[name]
        if src.kind == "same":
            out[src.hf] = t.contiguous()
        elif src.kind == "rows":
            buf = out.get(src.hf)
            if buf is None:
                buf = out[src.hf] = t.new_empty((src.hf_rows, *t.shape[1:]))
            buf[list(src.rows)] = t
        else:
            for e in range(t.shape[0]):
                out[src.hf.format(e=e)] = t[e].t().contiguous()
    for hf, ours in shared_copies(m).items():
        out[hf] = state[ours].clone()  # own storage: safetensors refuses shared tensors
    return out


def read_slice(src: Source, files: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """The region [offset, offset + shape) of the moetrain tensor `src` describes; `files`
    gives `get_slice(hf_name)` (safetensors slices), so only that region is read."""
    idx = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    if src.kind == "same":
        return files.get_slice(src.hf)[idx]
    if src.kind == "rows":
        wanted = torch.tensor(src.rows[idx[0]])
        if wanted.numel() == 0:
            return torch.empty(shape)
        lo, hi = int(wanted.min()), int(wanted.max()) + 1
        block = files.get_slice(src.hf)[(slice(lo, hi), *idx[1:])]
        return block[wanted - lo]
    # experts: moetrain [E, A, B] = per expert HF [B, A] transposed
    parts = [files.get_slice(src.hf.format(e=e))[idx[2], idx[1]].t()
             for e in range(idx[0].start, idx[0].stop)]
    return torch.stack(parts) if parts else torch.empty(shape)


__all__ = ["Source", "hf_names", "read_slice", "shared_copies", "tensor_map", "to_hf_state"]
