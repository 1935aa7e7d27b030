import math

import pytest
import torch

from moetrain.model.moe.capacity import capacity_keep_mask, expert_capacity
from moetrain.model.moe.router import Router


def identity_router(num_experts, top_k, score_func="softmax", norm=True):
    router = Router(num_experts, num_experts, top_k, score_func, norm)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))  # logits == inputs
    return router


def test_softmax_router_hand_example():
    x = torch.log(torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 2.0, 1.0, 4.0]]))
    out = identity_router(4, 2)(x)
    torch.testing.assert_close(out.scores_TE, torch.tensor([[0.5, 0.25, 0.125, 0.125],
                                                            [0.125, 0.25, 0.125, 0.5]]))
    assert out.topk_idx_TK.tolist() == [[0, 1], [3, 1]]
    torch.testing.assert_close(out.topk_weight_TK, torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3]]))
    unnormalised = identity_router(4, 2, norm=False)(x)
    torch.testing.assert_close(unnormalised.topk_weight_TK,
                               torch.tensor([[0.5, 0.25], [0.5, 0.25]]))
    assert out.logits_TE.dtype == torch.float32 and out.keep_TK is None


def test_sigmoid_router_hand_example():
    l3 = math.log(3.0)
    x = torch.tensor([[l3, 0.0, -l3, -2 * l3]])  # sigmoid: 3/4, 1/2, 1/4, 1/10
    out = identity_router(4, 2, "sigmoid")(x)
    torch.testing.assert_close(out.scores_TE, torch.tensor([[0.75, 0.5, 0.25, 0.1]]))
    assert out.topk_idx_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(out.topk_weight_TK, torch.tensor([[0.6, 0.4]]))
    raw = identity_router(4, 2, "sigmoid", norm=False)(x)
    torch.testing.assert_close(raw.topk_weight_TK, torch.tensor([[0.75, 0.5]]))


def test_router_logits_fp32_for_bf16_input():
    router = Router(8, 4, 2)
    torch.nn.init.normal_(router.weight)
    out = router(torch.randn(5, 8).bfloat16())
    assert out.logits_TE.dtype == torch.float32 and out.topk_weight_TK.dtype == torch.float32


def test_capacity_formula():
    assert expert_capacity(16, 2, 4, 1.0) == 8
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(10, 1, 4, 0.3) == 1


def test_capacity_keeps_highest_scores_hand_case():
    # 4 tokens, top-1, all to expert 0; capacity ceil(1.0 * 4 * 1 / 2) = 2.
    idx = torch.zeros(4, 1, dtype=torch.long)
    prio = torch.tensor([[0.6], [0.9], [0.7], [0.8]])
    keep = capacity_keep_mask(idx, prio, num_experts=2, capacity=expert_capacity(4, 1, 2, 1.0))
    assert keep.flatten().tolist() == [False, True, False, True]
    # ties are broken by token order
    keep = capacity_keep_mask(idx, torch.full((4, 1), 0.5), 2, 3)
    assert keep.flatten().tolist() == [True, True, True, False]


def test_capacity_per_expert_top2():
    # expert 1 gets 3 assignments (capacity 2): the 0.2 one (token 2, second choice) is dropped
    idx = torch.tensor([[0, 1], [1, 2], [2, 1], [3, 0]])
    prio = torch.tensor([[0.5, 0.4], [0.6, 0.3], [0.7, 0.2], [0.9, 0.1]])
    keep = capacity_keep_mask(idx, prio, num_experts=4, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, True]]
    # capacity large enough: nothing dropped
    assert capacity_keep_mask(idx, prio, 4, 3).all()


def _scatter_TE(keep_TK, idx_TK, E):
    return torch.zeros(idx_TK.shape[0], E, dtype=torch.bool).scatter(1, idx_TK, keep_TK)


@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_capacity_matches_deepspeed_topkgating_probs_policy(cf):
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    T, E, K = 16, 4, 2
    logits = torch.randn(T, E) * 2
    router = identity_router(E, K)
    out = router(logits)
    C = expert_capacity(T, K, E, cf)
    keep = capacity_keep_mask(out.topk_idx_TK, out.scores_TE.gather(1, out.topk_idx_TK), E, C)
    l_aux, combine_SEC, dispatch_SEC, counts = sharded_moe.topkgating(
        logits.clone(), K, cf, min_capacity=0, drop_policy="probs")
    assert combine_SEC.shape[-1] == C  # same capacity formula
    ds_keep_TE = dispatch_SEC.any(-1)
    assert torch.equal(_scatter_TE(keep, out.topk_idx_TK, E), ds_keep_TE)
    assert (~keep).any() or cf == 1.0
    # DeepSpeed renormalises the surviving weights; for tokens that lost nothing they agree.
    full = keep.all(-1)
    ours_TE = torch.zeros(T, E).scatter(1, out.topk_idx_TK, out.topk_weight_TK)
    torch.testing.assert_close(ours_TE[full], combine_SEC.sum(-1)[full])
    assert torch.equal(counts, torch.bincount(out.topk_idx_TK.flatten(), minlength=E))


def test_capacity_matches_deepspeed_top2gating_where_position_equals_score_order():
    """DeepSpeed's top2gating keeps first choices before second choices, each in token order.
    With logits whose scores fall with the token index and every first-choice score above every
    second-choice score, that order is exactly the score order moetrain keeps by."""
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    T, E, K, cf = 12, 4, 2, 0.5
    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, E, (T,), generator=g)
    second = (first + torch.randint(1, E, (T,), generator=g)) % E
    logits = torch.zeros(T, E)
    t = torch.arange(T, dtype=torch.float32)
    logits[torch.arange(T), first] = 10 - 0.1 * t
    logits[torch.arange(T), second] = 5 - 0.1 * t
    out = identity_router(E, K)(logits)
    C = expert_capacity(T, K, E, cf)
    keep = capacity_keep_mask(out.topk_idx_TK, out.scores_TE.gather(1, out.topk_idx_TK), E, C)
    _, combine_SEC, dispatch_SEC, _ = sharded_moe.top2gating(
        logits.clone(), cf, min_capacity=0, top2_2nd_expert_sampling=False)
    assert combine_SEC.shape[-1] == C
    assert (~keep).sum() > 0
    assert torch.equal(_scatter_TE(keep, out.topk_idx_TK, E), dispatch_SEC.any(-1))


def test_capacity_matches_megatron_token_dropping():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, E, K, cf = 20, 4, 2, 0.6
    logits = torch.randn(T, E) * 2
    out = identity_router(E, K, norm=False)(logits)  # Megatron ranks by these weights
    C = expert_capacity(T, K, E, cf)
    keep = capacity_keep_mask(out.topk_idx_TK, out.scores_TE.gather(1, out.topk_idx_TK), E, C)
    probs_TE = torch.zeros(T, E).scatter(1, out.topk_idx_TK, out.topk_weight_TK)
    map_TE = probs_TE > 0
    final_probs, final_map = moe_utils.apply_router_token_dropping(probs_TE, map_TE, K, cf)
    assert (~keep).sum() > 0
    assert torch.equal(_scatter_TE(keep, out.topk_idx_TK, E), final_map)
    kept_w = torch.zeros(T, E).scatter(1, out.topk_idx_TK, out.topk_weight_TK * keep)
    torch.testing.assert_close(kept_w, final_probs)
