"""Sparsity schedules: exact values per step for every kind, and their config validation."""

from types import SimpleNamespace

import pytest

from moetrain.config import ConfigError, MoEConfig, compose, to_object, validate
from moetrain.config.schema import SparsitySchedule, ValueSchedule
from moetrain.config.schema import MTPConfig
from moetrain.model.moe.schedule import capacity_factor_at, round_top_k, schedule_value, top_k_at
from moetrain.model.mtp import mtp_loss_scale_at


def moe_with(k_sched=None, cf_sched=None, **static) -> MoEConfig:
    """A MoEConfig with the given top_k / capacity_factor schedules and static fields."""
    return MoEConfig(schedule=SparsitySchedule(top_k=k_sched or ValueSchedule(),
                                               capacity_factor=cf_sched or ValueSchedule()),
                     **static)


def test_the_default_schedule_is_the_static_config():
    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=None)
    assert [top_k_at(moe, s) for s in (0, 1, 10**6)] == [2, 2, 2]
    assert capacity_factor_at(moe, 0) is None  # dropless stays dropless
    moe = MoEConfig(num_experts=8, top_k=3, capacity_factor=1.25)
    assert top_k_at(moe, 7) == 3 and capacity_factor_at(moe, 7) == 1.25


def test_constant_with_a_start_overrides_the_static_value():
    moe = moe_with(ValueSchedule(start=4), num_experts=8, top_k=2)
    assert [top_k_at(moe, s) for s in (0, 50)] == [4, 4]


def test_mtp_loss_scale_schedule_table():
    """DeepSeek-V3's MTP weight: lambda 0.3 -> 0.1 linearly over steps 10..30 (by hand:
    0.3 - 0.2 (s - 10) / 20), the start value before the ramp, the end value after it; the
    static loss_scale (1.0 here) only where start / end are unset."""
    mtp = MTPConfig(depth=1, loss_scale=1.0, loss_scale_schedule=ValueSchedule(
        "linear", start=0.3, end=0.1, start_step=10, end_step=30))
    got = [mtp_loss_scale_at(mtp, s) for s in (0, 10, 15, 20, 29, 30, 100)]
    assert got == pytest.approx([0.3, 0.3, 0.25, 0.2, 0.11, 0.1, 0.1], rel=1e-12)
    # start / end unset: loss_scale at both ends (a constant)
    flat = MTPConfig(depth=1, loss_scale=0.3, loss_scale_schedule=ValueSchedule(
        "linear", start_step=0, end_step=10))
    assert [mtp_loss_scale_at(flat, s) for s in (0, 5, 10)] == pytest.approx([0.3] * 3)


def test_linear_top_k_table():
    # 1 -> 4 over steps 10..40: v = 1 + (s - 10) / 10, rounded half up.
    moe = moe_with(ValueSchedule("linear", start=1, end=4, start_step=10, end_step=40),
                   num_experts=8, top_k=2)
    table = {0: 1, 10: 1, 14: 1, 15: 2, 24: 2, 25: 3, 34: 3, 35: 4, 40: 4, 1000: 4}
    assert {s: top_k_at(moe, s) for s in table} == table
    # 8 -> 2 over 0..10: v = 8 - 0.6 s; the step before end_step is not the end yet (2.6 -> 3)
    moe = moe_with(ValueSchedule("linear", start=8, end=2, start_step=0, end_step=10),
                   num_experts=8, top_k=2)
    assert [top_k_at(moe, s) for s in (8, 9, 10)] == [3, 3, 2]


def test_cosine_top_k_table():
    # 8 -> 2 over 0..100: v = 8 - 3 (1 - cos(pi s / 100)).
    # s=20: 7.427, 25: 7.121, 40: 5.927, 50: 5.0, 60: 4.073, 75: 2.879, 90: 2.147
    moe = moe_with(ValueSchedule("cosine", start=8, end=2, start_step=0, end_step=100),
                   num_experts=8, top_k=2)
    table = {0: 8, 20: 7, 25: 7, 40: 6, 50: 5, 60: 4, 75: 3, 90: 2, 100: 2, 500: 2}
    assert {s: top_k_at(moe, s) for s in table} == table
    assert schedule_value(moe.schedule.top_k, 50, 2) == pytest.approx(5.0)


def test_step_top_k_table_and_start_before_the_first_milestone():
    moe = moe_with(ValueSchedule("step", milestones=[[0, 8], [100, 4], [300, 2]]),
                   num_experts=8, top_k=1)
    table = {0: 8, 99: 8, 100: 4, 299: 4, 300: 2, 10**5: 2}
    assert {s: top_k_at(moe, s) for s in table} == table
    # Before the first milestone: start, and start=None means the static top_k.
    moe = moe_with(ValueSchedule("step", milestones=[[50, 1]]), num_experts=8, top_k=2)
    assert [top_k_at(moe, s) for s in (0, 49, 50)] == [2, 2, 1]
    moe = moe_with(ValueSchedule("step", start=6, milestones=[[50, 1]]), num_experts=8, top_k=2)
    assert [top_k_at(moe, s) for s in (49, 50)] == [6, 1]


def test_linear_endpoints_default_to_the_static_value():
    # start None -> top_k=2; 2 -> 6 over 0..8: v = 2 + s / 2.
    moe = moe_with(ValueSchedule("linear", end=6, start_step=0, end_step=8), num_experts=8, top_k=2)
    assert [top_k_at(moe, s) for s in range(0, 10)] == [2, 3, 3, 4, 4, 5, 5, 6, 6, 6]


def test_round_top_k_rounds_half_up_and_clamps():
    assert [round_top_k(v, 4) for v in (0.2, 1.49, 1.5, 2.5, 3.5, 4.4, 9.0)] == [1, 1, 2, 3, 4, 4, 4]


def test_capacity_factor_schedules():
    moe = moe_with(cf_sched=ValueSchedule("linear", start=2.0, end=1.0, end_step=100))
    assert [capacity_factor_at(moe, s) for s in (0, 25, 50, 99, 100, 200)] == pytest.approx(
        [2.0, 1.75, 1.5, 1.01, 1.0, 1.0])
    # a ramp that starts late: 2.0 until step 20, then 2.0 - (s - 20) / 80
    moe = moe_with(cf_sched=ValueSchedule("linear", start=2.0, end=1.0, start_step=20,
                                          end_step=100))
    assert [capacity_factor_at(moe, s) for s in (0, 20, 60, 100)] == pytest.approx(
        [2.0, 2.0, 1.5, 1.0])
    moe = moe_with(cf_sched=ValueSchedule("step", milestones=[[10, 1.25]]))
    assert [capacity_factor_at(moe, s) for s in (0, 9, 10)] == [None, None, 1.25]  # dropless first
    moe = moe_with(cf_sched=ValueSchedule("cosine", end=1.0, end_step=10), capacity_factor=3.0)
    assert [capacity_factor_at(moe, s) for s in (0, 5, 10)] == [3.0, pytest.approx(2.0), 1.0]


def test_schedule_value_takes_any_object_with_the_fields():
    sched = SimpleNamespace(kind="linear", start=0.0, end=1.0, start_step=0, end_step=4, milestones=[])
    assert [schedule_value(sched, s, None) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="unknown schedule kind"):
        schedule_value(SimpleNamespace(kind="exp", start=1, end=2), 0, 1)


# -- validation -----------------------------------------------------------------------------------

def config(*overrides):
    return to_object(compose(["+experiment=tiny", *overrides]))


def test_valid_schedules_compose_and_validate():
    S = "model.moe.schedule"
    validate(config())  # the default schedule leaves existing configs valid
    cfg = config(f"{S}.top_k.kind=linear", f"{S}.top_k.start=8", f"{S}.top_k.end=2",
                 f"{S}.top_k.end_step=100", f"{S}.capacity_factor.kind=step",
                 f"{S}.capacity_factor.milestones=[[0,2.0],[50,1]]")
    validate(cfg)
    assert top_k_at(cfg.model.moe, 50) == 5 and capacity_factor_at(cfg.model.moe, 60) == 1.0


def test_unknown_schedule_kind_is_refused_while_composing():
    with pytest.raises(ConfigError) as err:
        config("model.moe.schedule.top_k.kind=exponential")
    assert "model.moe.schedule.top_k.kind" in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["top_k.end=9", "top_k.kind=linear", "top_k.end_step=5"], "model.moe.schedule.top_k.end="),
    (["top_k.start=0"], "model.moe.schedule.top_k.start="),
    (["top_k.start=1.5"], "model.moe.schedule.top_k.start="),
    (["top_k.kind=linear", "top_k.start_step=10", "top_k.end_step=10"],
     "model.moe.schedule.top_k.end_step="),
    (["top_k.start_step=-1"], "model.moe.schedule.top_k.start_step="),
    (["top_k.kind=step"], "model.moe.schedule.top_k.milestones="),
    (["top_k.kind=step", "top_k.milestones=[[0,2],[0,1]]"], "model.moe.schedule.top_k.milestones[1]="),
    (["top_k.kind=step", "top_k.milestones=[[0,2],[5,10]]"], "model.moe.schedule.top_k.milestones[1]="),
    (["top_k.kind=step", "top_k.milestones=[[0,2,3]]"], "model.moe.schedule.top_k.milestones[0]="),
    (["capacity_factor.start=0"], "model.moe.schedule.capacity_factor.start="),
    # A ramp over a dropless config must say where it starts.
    (["capacity_factor.kind=linear", "capacity_factor.end=1.0", "capacity_factor.end_step=10"],
     "model.moe.schedule.capacity_factor.start="),
])
def test_invalid_schedules_name_the_key(overrides, key):
    cfg = config(*(f"model.moe.schedule.{o}" for o in overrides))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message, message
