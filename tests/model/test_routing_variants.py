"""Routing beyond plain top-k: threshold (top-p), null experts, aux-loss-free bias, groups, k changes."""

import torch
import torch.nn.functional as F

from moetrain.config.schema import RoutingConfig
from moetrain.config.schema import ValueSchedule
from moetrain.model.moe import MoELayer, Router
from tests.model.tiny import control, layer_stats, make_cfg, step_rows


def router_with_logits(logits_TE, top_k, **routing):
    """A router whose logits for the identity input rows are exactly `logits_TE`."""
    T, E = logits_TE.shape
    r = Router(T, E, top_k, routing=RoutingConfig(**routing))
    with torch.no_grad():
        r.weight.copy_(logits_TE.T)
    return r, torch.eye(T)


def test_top_p_takes_experts_until_the_probability_mass_is_reached():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    r, x = router_with_logits(probs.log(), top_k=4, top_p=0.7)
    out = r(x)
    assert out.topk_idx_TK.tolist() == [[0, 1, 2, 3], [1, 0, 2, 3]]
    # token 0: mass before each pick 0, .5, .8, .95 -> takes 2; token 1: 0, .9 -> takes 1
    assert out.selected_TK.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert out.active_TK.tolist() == out.selected_TK.tolist()
    torch.testing.assert_close(out.topk_weight_TK[0, :2], torch.tensor([0.625, 0.375]))
    assert out.topk_weight_TK[1, 0] == 1.0
    r.routing.min_k = 2  # at least two experts per token
    assert r(x).selected_TK.sum(-1).tolist() == [2, 2]


def test_top_p_with_sigmoid_scores_measures_the_mass_over_all_experts():
    """Sigmoid scores are not a distribution: top-p reads each chosen score as a share of the
    sum over ALL experts' scores (docs/load_balancing.md "Routing variants"), not of the chosen
    ones'; the combine weights are renormalised over the experts taken."""
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.95, 0.12, 0.1, 0.05]])
    r = Router(2, 4, 3, "sigmoid", norm_topk_prob=True, routing=RoutingConfig(top_p=0.6))
    with torch.no_grad():
        r.weight.copy_(torch.logit(s, eps=0).T)
    out = r(torch.eye(2))
    assert out.topk_idx_TK.tolist() == [[0, 1, 2], [0, 1, 2]]
    # token 0: shares of the sum 3.0: 0.3, 0.267, 0.233 -> mass before 0, 0.3, 0.567 < 0.6 -> 3
    # experts (over the chosen 2.4 it would be 0, 0.375, 0.708 -> 2); token 1: 0.95 / 1.22 > 0.6
    assert out.selected_TK.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(out.topk_weight_TK[0], s[0, :3] / s[0, :3].sum())
    assert out.topk_weight_TK[1, 0] == 1.0


def test_null_experts_are_selected_and_balanced_but_compute_nothing():
    cfg = make_cfg(moe=dict(num_experts=4, top_k=2))
    cfg.moe.routing.num_null_experts = 2
    layer = MoELayer(cfg.d_model, cfg.moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # make null slot 4 attractive to about half of the tokens
        layer.router.weight[4] = layer.router.weight[:4].mean(0)
        layer.router.weight[4, 0] += 3.0
    x = torch.randn(4, 8, cfg.d_model)
    x[..., 0] = torch.where(torch.rand(4, 8) < 0.5, 2.0, -2.0)
    y = layer(x)
    routing = layer.router(x.reshape(-1, cfg.d_model))
    null_TK = routing.topk_idx_TK >= 4
    assert null_TK.any() and (~null_TK).any()
    assert torch.equal(routing.active_TK, ~null_TK)
    stats = layer_stats(layer)
    assert stats.assignments == int((~null_TK).sum()) < 2 * 32  # fewer real experts per token
    assert stats.tokens_per_expert.numel() == 4 and int(stats.tokens_per_expert.sum()) == stats.assignments
    # the output is the weighted sum over the real experts only (null weight is lost)
    x_TD = x.reshape(-1, cfg.d_model)
    ex = layer.experts
    expected = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(2):
            e = int(routing.topk_idx_TK[t, j])
            if e < 4:
                h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
                expected[t] += routing.topk_weight_TK[t, j] * (h @ ex.w2[e])
    torch.testing.assert_close(y.reshape(-1, cfg.d_model), expected, rtol=1e-5, atol=1e-5)
    assert layer.lbl.num_experts == 6  # null slots have their share in the LBL


def test_aux_loss_free_bias_lowers_the_load_cv_of_a_skewed_router():
    torch.manual_seed(0)
    E, D = 8, 16
    r = Router(D, E, 2, routing=RoutingConfig(bias_rate=0.01))
    x = torch.randn(512, D)
    x[:, 0] = 1.0  # a constant feature through which experts 0 and 1 are favoured
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
        r.weight[:, 0] = 0.0
        r.weight[0, 0], r.weight[1, 0] = 2.0, 1.0

    def load_cv():
        idx = r(x).topk_idx_TK
        load = torch.bincount(idx.reshape(-1), minlength=E).float()
        return load, float(load.std(unbiased=False) / load.mean())

    load, before = load_cv()
    for _ in range(100):
        r.update_bias(load)
        load, cv = load_cv()
    assert before > 0.5 and cv < 0.25 * before, (before, cv)
    # the bias only selects: weights still come from the unbiased scores
    out = r(x)
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.ones(512))
    assert r.expert_bias[0] < 0 and "expert_bias" in r.state_dict()


def test_finishing_a_step_moves_each_layers_bias_by_its_own_loads():
    cfg = make_cfg(moe=dict(num_experts=4, top_k=2), n_layers=2)
    cfg.moe.routing.bias_rate = 0.5
    layers = torch.nn.ModuleList([MoELayer(cfg.d_model, cfg.moe, moe_index=i) for i in (1, 0)])
    moe = control(layers, cfg.moe)
    rows = torch.zeros(2, moe.columns.width, dtype=torch.float64)
    first = 7  # the per-slot counts follow the scalar columns (moe/stats.py)
    rows[0, first:first + 4] = torch.tensor([10, 2, 4, 4])
    rows[1, first:first + 4] = torch.tensor([1, 3, 3, 1])
    moe.finish_step(moe.columns.view(rows))
    assert layers[1].router.expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]  # moe_index 0
    assert layers[0].router.expert_bias.tolist() == [0.5, -0.5, -0.5, 0.5]  # moe_index 1


def test_balanced_groups_pick_equally_from_every_group_and_limited_groups_stay_inside():
    torch.manual_seed(1)
    logits = torch.randn(64, 8) * 3
    r, x = router_with_logits(logits, top_k=4, group_mode="balanced", num_groups=2)
    idx = r(x).topk_idx_TK
    assert ((idx < 4).sum(-1) == 2).all() and ((idx >= 4).sum(-1) == 2).all()
    r, x = router_with_logits(logits, top_k=2, group_mode="limited", num_groups=4, topk_groups=1)
    idx = r(x).topk_idx_TK
    assert (idx[:, 0] // 2 == idx[:, 1] // 2).all()  # both picks in one group of two experts
    plain, _ = router_with_logits(logits, top_k=2)
    assert not torch.equal(plain(x).topk_idx_TK, idx)  # the restriction did change choices


def test_a_steps_schedules_change_the_forwards_of_that_step():
    cfg = make_cfg(moe=dict(num_experts=4, top_k=4))
    cfg.moe.schedule.top_k = ValueSchedule(kind="step", milestones=[[1, 1]])
    # capacity ceil(0.5 * 16 * 1 / 4) = 2 per expert from step 2 on
    cfg.moe.schedule.capacity_factor = ValueSchedule(kind="step", milestones=[[2, 0.5]])
    layer = MoELayer(cfg.d_model, cfg.moe)
    moe = control(layer, cfg.moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 8, cfg.d_model)
    assert moe.start_step(0).top_k == 4
    layer(x)
    assert layer_stats(layer).assignments == 64  # dense: all four experts
    assert moe.start_step(1).top_k == 1
    layer(x)
    assert layer_stats(layer).assignments == 16 and layer_stats(layer).dropped == 0
    assert moe.start_step(2).capacity_factor == 0.5
    layer(x)
    stats = layer_stats(layer)
    load = layer.router(x.reshape(-1, 32), 1).topk_idx_TK.reshape(-1).bincount(minlength=4)
    assert 0 < stats.dropped and stats.dropped == 16 - int(load.clamp(max=2).sum())
    with moe.evaluation():  # dropless (train.eval_capacity_factor null), the step's top-k
        layer.eval()
        before = step_rows(layer).rows_LC
        layer(x)
        assert torch.equal(step_rows(layer).rows_LC, before)  # no statistics in evaluation
        layer.train()
        layer(x)
        assert layer_stats(layer, since=before).dropped == 0
        assert layer_stats(layer, since=before).assignments == 16
    after = step_rows(layer).rows_LC
    layer(x)  # the step's capacity again
    assert layer_stats(layer, since=after).dropped == stats.dropped


def test_top_p_assignments_outside_the_threshold_do_not_use_capacity():
    cfg = make_cfg(moe=dict(num_experts=4, top_k=4, capacity_factor=1.0))
    cfg.moe.routing.top_p = 0.5
    layer = MoELayer(cfg.d_model, cfg.moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 16, cfg.d_model)
    layer(x)
    stats = layer_stats(layer)
    routing = layer.router(x.reshape(-1, 32))
    assert stats.assignments == int(routing.selected_TK.sum()) < 64
    per_expert = routing.topk_idx_TK[routing.selected_TK].bincount(minlength=4)
    assert stats.dropped == int((per_expert - 16).clamp(min=0).sum())  # capacity 16 per expert
