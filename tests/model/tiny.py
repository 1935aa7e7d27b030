"""Tiny fp32 model configs for the model tests."""

from __future__ import annotations

from types import SimpleNamespace

from moetrain.config.schema import LBLConfig, ModelConfig, MoEConfig
from moetrain.model import moe_step_stats


def make_cfg(moe: dict | None = None, lbl: dict | None = None, **model) -> ModelConfig:
    """Keyword overrides for ModelConfig (**model), MoEConfig (moe) and LBLConfig (lbl)."""
    moe_kw = dict(num_experts=4, top_k=2, expert_hidden=16)
    moe_kw.update(moe or {})
    moe_cfg = MoEConfig(**moe_kw, lbl=LBLConfig(**(lbl or {})))
    model_kw = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    model_kw.update(model)
    return ModelConfig(**model_kw, moe=moe_cfg)


def layer_stats(model, index: int = 0, since=None) -> SimpleNamespace:
    """MoE layer `index`'s statistics summed over the forwards since the last start of a step
    (or since the rows `since`, a `moe_step_stats(...).rows_LC` taken earlier)."""
    stats = moe_step_stats(model)
    if since is not None:
        stats = stats.columns.view(stats.rows_LC - since)
    col = lambda name: stats.scalar(name)[index]  # noqa: E731
    return SimpleNamespace(
        lbl=col("lbl"), z_loss=col("z_loss"), dropped=col("dropped"),
        assignments=col("assignments"), tokens=col("tokens"),
        router_entropy=col("entropy") / col("forwards"),
        tokens_per_expert=stats.tokens_per_expert[index], slot_counts=stats.slot_counts[index],
        prob_sum=stats.prob_sum[index])
