"""Sparsity schedules: the value of top_k or of the capacity factor at an optimizer step.

Pure functions of (schedule, step): no state, so a resumed run recomputes the same value from the
step counter alone and every rank agrees without communication. A schedule is a
`moetrain.config.schema.ValueSchedule` (or anything with the same attributes):

    constant  v(s) = start
    linear    v(s) = start + (end - start) * r(s)
    cosine    v(s) = start + (end - start) * (1 - cos(pi * r(s))) / 2
    step      v(s) = the value of the last milestone (m_step, m_value) with m_step <= s,
              `start` before the first milestone
    with r(s) = clamp((s - start_step) / (end_step - start_step), 0, 1)

so linear and cosine hold `start` up to `start_step` and `end` from `end_step` on. A `start` or
`end` of None means the static config value (`model.moe.top_k`, `model.moe.capacity_factor`),
so the default schedule (kind constant, start None) leaves a config unchanged.

top_k: the real value is rounded to the nearest integer, halves rounded up (floor(v + 0.5), not
Python's round-half-to-even, so a linear ramp 1 -> 2 switches exactly at its midpoint), then
clamped to [1, num_experts].

The trainer sets the values of step s on every MoE layer before the step's first micro-batch
(docs/sparsity_schedules.md).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from moetrain.config.schema import ScheduleKind



def schedule_value(sched: Any, step: int, default: Optional[float]) -> Optional[float]:
    """The scheduled value at optimizer step `step`; `default` replaces a None start or end.

    Returns None only when the value it would return is an unset endpoint whose default is None
    (e.g. a constant capacity-factor schedule over a dropless config).
    """
    start = default if sched.start is None else sched.start
    end = default if sched.end is None else sched.end
    kind = sched.kind
    if kind == "constant":
        return start
    if kind == "step":
        value = start
        for m_step, m_value in sorted(sched.milestones, key=lambda m: m[0]):
            if step >= m_step:
                value = m_value
        return value
    if kind not in ("linear", "cosine"):
        raise ValueError(f"unknown schedule kind {kind!r}; known: {', '.join(ScheduleKind.values())}")
    if step <= sched.start_step:
        return start
    if step >= sched.end_step:
        return end
    if start is None or end is None:
        raise ValueError(f"a {kind} schedule needs both start and end (or a non-null default)")
    r = (step - sched.start_step) / (sched.end_step - sched.start_step)
    if kind == "cosine":
        r = (1.0 - math.cos(math.pi * r)) / 2.0
    return start + (end - start) * r


def round_top_k(value: float, num_experts: int) -> int:
    """Round to the nearest integer (halves up) and clamp to [1, num_experts]."""
    return max(1, min(num_experts, math.floor(value + 0.5)))


def top_k_at(moe: Any, step: int) -> int:
    """top_k at `step` for a `MoEConfig` (its `schedule.top_k` over its static `top_k`)."""
    value = schedule_value(moe.schedule.top_k, step, moe.top_k)
    return round_top_k(value, moe.num_experts)


def capacity_factor_at(moe: Any, step: int) -> Optional[float]:
    """Capacity factor at `step` for a `MoEConfig`; None means dropless."""
    value = schedule_value(moe.schedule.capacity_factor, step, moe.capacity_factor)
    return None if value is None else float(value)


__all__ = ["capacity_factor_at", "round_top_k", "schedule_value", "top_k_at"]
