"""What a training step's one reduction carries, by name and shape, from the config.

    fields = step_fields(cfg, world_size)      # {"lm_sum": (), ..., "moe": (L, C), ...}
    width = field_width(fields)                # float64 values of the packed vector

The trainer packs these values into the step's one all-reduce (`StepRunner.reduce_step`,
moetrain/parallel/reduction.py) and checks, every step, that what it packed is exactly this
(`check_step_fields`); the planner counts the all-reduce's bytes from it (moetrain/plan_comm.py).
One description read by both, so the planned bytes cannot drift from the packed ones.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from moetrain.model.moe.stats import StatsColumns
from moetrain.model.mtp import num_moe_layers

Shape = tuple[int, ...]


def step_fields(cfg: Any, world_size: int) -> dict[str, Shape]:
    """{name: shape} of the values one training step reduces over `world_size` ranks (a
    `MoetrainConfig`):

    - per-token sums of the loss (`parallel/loss.py` `StepLoss.sums`): lm_sum, lm_targets, and
      per MTP depth mtp_sum [D], mtp_targets [D];
    - grad_sq: each rank's share of the squared global gradient norm;
    - stop: the stop flag (preemption, time limit);
    - moe [L, C]: the statistics rows of the L MoE layers (`StatsColumns`, C columns);
    - with `model.moe.ep_budget`: ep_overflow, ep_rows, ep_slots, and ep_need [world];
    - memory_peak [world]: every rank's peak memory;
    - with `optim.qk_clip_threshold`: head_max [world, n_layers + D, n_heads] (QK-clip).
    [world] values are per-rank slots: each rank fills its own."""
    model, moe = cfg.model, cfg.model.moe
    depth = model.mtp.depth
    fields: dict[str, Shape] = {"lm_sum": (), "lm_targets": (), "mtp_sum": (depth,),
                                "mtp_targets": (depth,), "grad_sq": (), "stop": ()}
    n_moe = num_moe_layers(model)
    if n_moe:
        fields["moe"] = (n_moe, StatsColumns.of(moe).width)
    budget = moe.ep_budget is not None
    if budget:
        fields.update(ep_overflow=(), ep_rows=(), ep_slots=())
    fields["memory_peak"] = (world_size,)
    if budget:
        fields["ep_need"] = (world_size,)
    if cfg.optim.qk_clip_threshold is not None:
        fields["head_max"] = (world_size, model.n_layers + depth, model.n_heads)
    return fields


def field_width(fields: Mapping[str, Shape]) -> int:
    """Values of the packed vector (each field's elements)."""
    return sum(math.prod(shape) for shape in fields.values())


def check_step_fields(packed: Mapping[str, Shape], fields: Mapping[str, Shape]) -> None:
    """Raises RuntimeError naming each difference between the shapes a step packed and
    `step_fields`' (a value added to the step's reduction without its description, so the
    planner would miscount its bytes)."""
    if dict(packed) == dict(fields):
        return
    diff = [f"{name}: packed {packed.get(name)}, described {fields.get(name)}"
            for name in sorted(set(packed) | set(fields)) if packed.get(name) != fields.get(name)]
    raise RuntimeError("the step's reduction differs from moetrain.step_fields.step_fields: "
                       + "; ".join(diff))


__all__ = ["check_step_fields", "field_width", "step_fields"]
