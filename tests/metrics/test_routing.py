import pytest
import torch

from moetrain.metrics import summarize_routing
from moetrain.model.moe.stats import StatsColumns


def rows(*layers, tokens=None):
    """Statistics rows [L, C] of one forward of each layer: (counts, lbl, z, dropped, entropy,
    prob_sum) per layer, tokens = assignments // 2 (top-2) unless given."""
    columns = StatsColumns(len(layers[0]["counts"]), len(layers[0]["counts"]))
    out = []
    for layer in layers:
        counts = torch.tensor(layer["counts"])
        n_tokens = int(counts.sum()) // 2 if tokens is None else tokens
        out.append(columns.row(
            lbl=layer.get("lbl", 1.0), z_loss=layer.get("z", 0.5), dropped=layer.get("dropped", 0),
            assignments=int(counts.sum()), entropy=layer.get("entropy", 1.0), tokens=n_tokens,
            slot_counts=counts, prob_sum=torch.tensor(layer.get("prob_sum", [0.0] * len(counts)))))
    return columns, torch.stack(out)


def summarize(columns, rows_LC, micro_batches=1, lbl_coeff=1.0, z_coeff=1.0, scope="micro"):
    return summarize_routing(columns.view(rows_LC), micro_batches, lbl_coeff, z_coeff, scope)


def test_step_statistics_sum_counts_and_average_losses_over_micro_batches():
    columns, a = rows(dict(counts=[4, 0, 2, 2], lbl=1.0, dropped=1, entropy=1.0))
    _, b = rows(dict(counts=[0, 4, 2, 2], lbl=3.0, dropped=3, entropy=2.0))
    scalars, record = summarize(columns, a + b, micro_batches=2, lbl_coeff=0.1, z_coeff=0.01)
    layer = record["layers"][0]
    assert layer["tokens_per_expert"] == [4, 4, 4, 4]
    assert layer["lbl"] == pytest.approx(2.0)  # the mean of the micro-batches' 1 and 3
    assert layer["load_cv"] == 0.0 and scalars["load_cv"] == 0.0  # balanced over the whole step
    assert scalars["aux_loss"] == pytest.approx(0.1 * 2.0)
    assert scalars["z_loss"] == pytest.approx(0.01 * 0.5)
    assert scalars["dropped_frac"] == pytest.approx(4 / 16)
    assert scalars["router_entropy"] == pytest.approx(1.5)
    assert scalars["experts_per_token"] == pytest.approx(2.0)  # top-2 routing


def test_load_cv_is_the_population_coefficient_of_variation():
    columns, r = rows(dict(counts=[6, 2, 0, 0]), dict(counts=[1, 1, 1, 1]))
    scalars, record = summarize(columns, r)
    cv0 = torch.tensor([6.0, 2, 0, 0]).std(unbiased=False) / 2.0
    assert record["layers"][0]["load_cv"] == pytest.approx(float(cv0))
    assert record["layers"][1]["load_cv"] == 0.0
    assert scalars["load_cv"] == pytest.approx(float(cv0) / 2)
    assert record["layers"][0]["max_load_ratio"] == pytest.approx(3.0)


def test_summaries_are_of_the_rows_summed_over_ranks():
    # two ranks whose counts mirror each other: [2, 0] + [0, 2] is balanced
    columns, mine = rows(dict(counts=[2, 0]))
    _, other = rows(dict(counts=[0, 2]))
    _, record = summarize(columns, mine + other)
    assert record["layers"][0]["tokens_per_expert"] == [2, 2] and record["layers"][0]["load_cv"] == 0.0


def test_global_scope_logs_the_lbl_of_the_whole_step():
    # the per-micro-batch value (9) must not be what is logged
    columns, a = rows(dict(counts=[4, 0], lbl=9.0, prob_sum=[1.5, 0.5]), tokens=2)
    _, b = rows(dict(counts=[0, 4], lbl=9.0, prob_sum=[0.5, 1.5]), tokens=2)
    scalars, _ = summarize(columns, a + b, micro_batches=2, lbl_coeff=0.5, scope="global")
    # step: f = [4, 4] / 8, p = [2, 2] / 4 -> LBL = 2 * (0.5 * 0.5 + 0.5 * 0.5) = 1
    assert scalars["aux_loss"] == pytest.approx(0.5 * 1.0)
    micro_scalars, _ = summarize(columns, a + b, micro_batches=2, lbl_coeff=0.5, scope="micro")
    assert micro_scalars["aux_loss"] == pytest.approx(0.5 * 9.0)


def test_no_moe_layers():
    scalars, record = summarize_routing(None, 1, 1.0, 1.0, "micro")
    assert record == {"layers": []} and scalars["aux_loss"] == 0.0
