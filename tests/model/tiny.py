"""Tiny fp32 model configs for the model tests."""

from __future__ import annotations

from moetrain.config.schema import LBLConfig, ModelConfig, MoEConfig


def make_cfg(moe: dict | None = None, lbl: dict | None = None, **model) -> ModelConfig:
    """Keyword overrides for ModelConfig (**model), MoEConfig (moe) and LBLConfig (lbl)."""
    moe_kw = dict(num_experts=4, top_k=2, expert_hidden=16)
    moe_kw.update(moe or {})
    moe_cfg = MoEConfig(**moe_kw, lbl=LBLConfig(**(lbl or {})))
    model_kw = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    model_kw.update(model)
    return ModelConfig(**model_kw, moe=moe_cfg)
