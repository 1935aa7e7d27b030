from types import SimpleNamespace

import pytest
import torch

from moetrain.metrics import RoutingAccumulator


def stats(counts, lbl=1.0, z=0.5, dropped=0, entropy=1.0):
    counts = torch.tensor(counts)
    return SimpleNamespace(tokens_per_expert=counts, lbl=torch.tensor(lbl), z_loss=torch.tensor(z),
                           dropped=torch.tensor(dropped), assignments=int(counts.sum()),
                           router_entropy=torch.tensor(entropy), tokens=int(counts.sum()) // 2)


def test_step_statistics_sum_counts_and_average_losses_over_micro_batches():
    acc = RoutingAccumulator()
    acc.add([stats([4, 0, 2, 2], lbl=1.0, dropped=1, entropy=1.0)])
    acc.add([stats([0, 4, 2, 2], lbl=3.0, dropped=3, entropy=2.0)])
    scalars, record = acc.summarize(lbl_coeff=0.1, z_coeff=0.01)
    layer = record["layers"][0]
    assert layer["tokens_per_expert"] == [4, 4, 4, 4]
    assert layer["load_cv"] == 0.0 and scalars["load_cv"] == 0.0  # balanced over the whole step
    assert scalars["aux_loss"] == pytest.approx(0.1 * 2.0)
    assert scalars["z_loss"] == pytest.approx(0.01 * 0.5)
    assert scalars["dropped_frac"] == pytest.approx(4 / 16)
    assert scalars["router_entropy"] == pytest.approx(1.5)
    assert scalars["experts_per_token"] == pytest.approx(2.0)  # top-2 routing


def test_load_cv_is_the_population_coefficient_of_variation():
    acc = RoutingAccumulator()
    acc.add([stats([6, 2, 0, 0]), stats([1, 1, 1, 1])])
    scalars, record = acc.summarize()
    cv0 = torch.tensor([6.0, 2, 0, 0]).std(unbiased=False) / 2.0
    assert record["layers"][0]["load_cv"] == pytest.approx(float(cv0))
    assert record["layers"][1]["load_cv"] == 0.0
    assert scalars["load_cv"] == pytest.approx(float(cv0) / 2)
    assert record["layers"][0]["max_load_ratio"] == pytest.approx(3.0)


def test_summaries_are_reduced_over_ranks_before_ratios():
    acc = RoutingAccumulator()
    acc.add([stats([2, 0])])
    # a fake all-reduce over two ranks whose counts mirror each other: [2,0] + [0,2]
    mirror = lambda t: t + torch.cat([t[:2].flip(0), t[2:]])  # noqa: E731
    _, record = acc.summarize(mirror)
    assert record["layers"][0]["tokens_per_expert"] == [2, 2] and record["layers"][0]["load_cv"] == 0.0


def test_global_scope_logs_the_lbl_of_the_whole_step():
    def micro(counts, prob_sum, tokens):
        s = stats(counts, lbl=9.0)  # the per-micro-batch value must not be what is logged
        s.slot_counts, s.prob_sum, s.tokens = torch.tensor(counts), torch.tensor(prob_sum), tokens
        return s

    acc = RoutingAccumulator()
    acc.add([micro([4, 0], [1.5, 0.5], 2)])
    acc.add([micro([0, 4], [0.5, 1.5], 2)])
    scalars, _ = acc.summarize(lbl_coeff=0.5, lbl_scope="global")
    # step: f = [4, 4] / 8, p = [2, 2] / 4 -> LBL = 2 * (0.5 * 0.5 + 0.5 * 0.5) = 1
    assert scalars["aux_loss"] == pytest.approx(0.5 * 1.0)
    micro_scalars, _ = acc.summarize(lbl_coeff=0.5, lbl_scope="micro")
    assert micro_scalars["aux_loss"] == pytest.approx(0.5 * 9.0)
