"""moetrain/metrics/specialisation.py: hand-computed values."""

import math

import numpy as np
import pytest

from moetrain.metrics.specialisation import (
    expert_distributions, kl_divergence, mean_max_share, mutual_information, per_source_kl,
    specialisation_summary,
)


def test_kl_hand_computed():
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3)
    assert kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))  # 0 log 0 = 0
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf


def test_identical_sources_have_zero_mi():
    counts = [[3, 1, 4], [6, 2, 8]]
    assert mutual_information(counts) == pytest.approx(0.0)
    assert per_source_kl(counts) == pytest.approx([0.0, 0.0])


def test_fully_specialised_two_sources():
    # Each source uses its own expert: P(e|s) one-hot, P(e) = [1/2, 1/2] -> MI = ln 2 = H(e).
    counts = [[10, 0], [0, 10]]
    assert mutual_information(counts) == pytest.approx(math.log(2))
    assert mean_max_share(counts) == pytest.approx(1.0)
    s = specialisation_summary(counts)
    assert s["mi_over_h_expert"] == pytest.approx(1.0)


def test_unequal_sources_weight_by_tokens():
    # Source 0: 30 assignments [20, 10]; source 1: 10 assignments [0, 10].
    counts = np.array([[20, 10], [0, 10]])
    p_es, p_e, p_s = expert_distributions(counts)
    assert p_e == pytest.approx([0.5, 0.5])
    assert p_s == pytest.approx([0.75, 0.25])
    kl0 = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    kl1 = math.log(2)
    assert per_source_kl(counts) == pytest.approx([kl0, kl1])
    assert mutual_information(counts) == pytest.approx(0.75 * kl0 + 0.25 * kl1)
    assert mean_max_share(counts) == pytest.approx((2 / 3 + 1) / 2)


def test_rejects_empty_source():
    with pytest.raises(ValueError):
        mutual_information([[1, 2], [0, 0]])
