"""The sync-free exchange's budget policy (moetrain/model/moe/budget.py): an overflowing attempt
asks for a redo with a budget that covers its need, a redo that overflows again at least
doubles it, and after steps that fit the budget returns to the configured one."""

import pytest

from moetrain.model.moe.budget import ExchangeBudget


def test_an_attempt_that_fits_keeps_the_configured_budget():
    b = ExchangeBudget(1.5)
    assert not b.after_attempt(overflowed=False, need=1.2)
    assert b.factor == 1.5


def test_an_overflow_is_redone_with_a_quantised_budget_covering_the_need_with_headroom():
    b = ExchangeBudget(1.25)
    assert b.after_attempt(overflowed=True, need=1.9)
    # 1.9 x 1.1 = 2.09 -> the next multiple of 1/8
    assert b.factor == 2.125 and b.factor >= 1.9 * ExchangeBudget.HEADROOM
    assert not b.after_attempt(overflowed=False, need=1.9)  # the redo fits
    assert b.factor == 2.125


def test_a_redo_that_overflows_again_at_least_doubles_and_always_grows():
    b = ExchangeBudget(1.0)
    assert b.after_attempt(overflowed=True, need=1.05)
    first = b.factor  # cover(1.05) = 1.25
    assert first == 1.25
    assert b.after_attempt(overflowed=True, need=1.1)  # a later layer needed more
    assert b.factor == 2 * first
    # a need the budget already covered (rounding at the slot) still grows it
    c = ExchangeBudget(2.0)
    assert c.after_attempt(overflowed=True, need=1.5)
    assert c.factor == 2.125


def test_the_budget_shrinks_back_to_the_configured_one_once_the_spike_left_the_window():
    b = ExchangeBudget(1.5)
    b.after_attempt(overflowed=True, need=3.0)
    b.after_attempt(overflowed=False, need=3.0)
    spike = b.factor
    assert spike == 3.375
    for _ in range(ExchangeBudget.WINDOW - 1):
        assert not b.after_attempt(overflowed=False, need=1.2)
        assert b.factor == spike  # the spike is still in the window
    b.after_attempt(overflowed=False, need=1.2)
    assert b.factor == 1.5  # cover(1.2) = 1.375 < the configured 1.5
    # it never drops below the configured budget and shrinks only to the window's cover
    b.after_attempt(overflowed=True, need=2.0)
    b.after_attempt(overflowed=False, need=2.0)
    for _ in range(ExchangeBudget.WINDOW):
        b.after_attempt(overflowed=False, need=1.6)
    assert b.factor == 1.875  # cover(1.6) = 1.76 -> 1.875 > 1.5


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        ExchangeBudget(0.0)
