"""Tiny fp32 model configs for the model tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from moetrain.config.schema import LBLConfig, ModelConfig, MoEConfig
from moetrain.model import MoEControl, moe_layers
from moetrain.model.moe.stats import MoEStepStats


def make_cfg(moe: dict | None = None, lbl: dict | None = None, **model) -> ModelConfig:
    """Keyword overrides for ModelConfig (**model), MoEConfig (moe) and LBLConfig (lbl)."""
    moe_kw = dict(num_experts=4, top_k=2, expert_hidden=16)
    moe_kw.update(moe or {})
    moe_cfg = MoEConfig(**moe_kw, lbl=LBLConfig(**(lbl or {})))
    model_kw = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    model_kw.update(model)
    return ModelConfig(**model_kw, moe=moe_cfg)


def control(model, moe: MoEConfig, micro_batches: int = 1) -> MoEControl:
    """The trainer's MoE control surface over `model` (a Transformer, a block or one MoELayer)."""
    n = 1 + max(layer.moe_index for layer in moe_layers(model))
    return MoEControl(model, moe, num_moe_layers=n, micro_batches_per_step=micro_batches)


def start_step(model, aux_loss_scale: float) -> None:
    """Start a step on every MoE layer of `model` at its config's routing, with an arbitrary aux
    loss gradient (the trainer's `MoEControl` gives 1 / micro-batches)."""
    for layer in moe_layers(model):
        layer.start_step(top_k=layer.top_k, capacity_factor=layer.capacity_factor,
                         aux_loss_scale=aux_loss_scale)


def step_rows(model) -> MoEStepStats:
    """The statistics rows [MoE layers, width] of `model`'s layers, by `moe_index`."""
    layers = moe_layers(model)
    columns = layers[0].stats_columns
    rows = torch.zeros(1 + max(layer.moe_index for layer in layers), columns.width,
                       dtype=torch.float64)
    for layer in layers:
        rows[layer.moe_index] = layer.step_stats
    return columns.view(rows)


def layer_stats(model, index: int = 0, since=None) -> SimpleNamespace:
    """MoE layer `index`'s statistics summed over the forwards since the last start of a step
    (or since the rows `since`, a `step_rows(...).rows_LC` taken earlier)."""
    stats = step_rows(model)
    if since is not None:
        stats = stats.columns.view(stats.rows_LC - since)
    col = lambda name: stats.scalar(name)[index]  # noqa: E731
    return SimpleNamespace(
        lbl=col("lbl"), z_loss=col("z_loss"), dropped=col("dropped"),
        assignments=col("assignments"), tokens=col("tokens"),
        router_entropy=col("entropy") / col("forwards"),
        tokens_per_expert=stats.tokens_per_expert[index], slot_counts=stats.slot_counts[index],
        prob_sum=stats.prob_sum[index])
