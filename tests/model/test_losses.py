import math

import pytest
import torch

from moetrain.model.moe.losses import (
    AttachAuxLoss, LoadBalancingLoss, score_distribution, z_loss,
)


def random_routing(T, E, K, score_func="softmax"):
    logits = (torch.randn(T, E) * 2).requires_grad_()
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    probs = score_distribution(scores, score_func)
    idx = scores.topk(K, dim=-1).indices
    return logits, probs, idx


def test_lbl_and_z_hand_example():
    # probs of the router hand example (test_router): top-2 = {0,1} and {3,1}
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.125, 0.25, 0.125, 0.5]])
    idx = torch.tensor([[0, 1], [3, 1]])
    lbl, counts = LoadBalancingLoss(4, "micro")(probs, idx)
    # f = [1, 2, 0, 1] / 4, p = [0.3125, 0.25, 0.125, 0.3125]
    assert counts.tolist() == [1, 2, 0, 1]
    torch.testing.assert_close(lbl, torch.tensor(4 * (0.25 * 0.3125 + 0.5 * 0.25 + 0.25 * 0.3125)))
    torch.testing.assert_close(lbl, torch.tensor(1.125))
    logits = torch.log(torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 2.0, 1.0, 4.0]]))
    torch.testing.assert_close(z_loss(logits), torch.tensor(math.log(8.0) ** 2))


def test_sigmoid_distribution_sums_to_one():
    s = torch.tensor([[0.75, 0.5, 0.25, 0.5]])
    torch.testing.assert_close(score_distribution(s, "sigmoid"), s / 2.0)
    assert score_distribution(s, "softmax") is s


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_lbl_and_z_match_megatron(score_func):
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, E, K = 24, 6, 2
    logits, _, _ = random_routing(T, E, K)
    routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(logits, K, score_func)
    ref = moe_utils.switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=routing_map.sum(0), total_num_tokens=T, topk=K,
        num_experts=E, moe_aux_loss_coeff=1.0)
    raw = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    idx = raw.topk(K, dim=-1).indices
    ours, _ = LoadBalancingLoss(E, "micro")(score_distribution(raw, score_func), idx)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)
    torch.testing.assert_close(z_loss(logits), moe_utils.z_loss_func(logits, 1.0))


def test_lbl_matches_deepspeed_topkgating_l_aux():
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    T, E, K = 16, 4, 2
    logits, probs, idx = random_routing(T, E, K)
    l_aux = sharded_moe.topkgating(logits.detach().clone(), K, 1.0, 0)[0]
    torch.testing.assert_close(LoadBalancingLoss(E)(probs, idx)[0], l_aux)


def test_seq_scope_hand_and_megatron():
    B, S, E, K = 3, 5, 4, 2
    _, probs, idx = random_routing(B * S, E, K)
    lbl, counts = LoadBalancingLoss(E, "seq")(probs, idx, batch_size=B)
    per_seq = []
    for b in range(B):
        p_b, i_b = probs[b * S:(b + 1) * S], idx[b * S:(b + 1) * S]
        f = torch.bincount(i_b.flatten(), minlength=E).float() / (S * K)
        per_seq.append(E * (f * p_b.mean(0)).sum())
    torch.testing.assert_close(lbl, torch.stack(per_seq).mean())
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=E))

    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    # Megatron's sequence-level loss works on [S, B*E] (sequence-major tokens)
    map_TE = torch.zeros(B * S, E).scatter(1, idx, 1.0)
    probs_SBE = probs.view(B, S, E).transpose(0, 1).reshape(S, B * E)
    map_SBE = map_TE.view(B, S, E).transpose(0, 1).reshape(S, B * E)
    ref = moe_utils.switch_load_balancing_loss_func(
        probs=probs_SBE, tokens_per_expert=map_SBE.sum(0), total_num_tokens=S, topk=K,
        num_experts=E, moe_aux_loss_coeff=1.0) / B
    torch.testing.assert_close(lbl, ref)


def test_global_scope_accumulates_reduced_counts_over_micro_batches():
    T, E, K = 10, 4, 2
    lbl_mod = LoadBalancingLoss(E, "global")
    other_rank = torch.tensor([3, 0, 5, 2])  # counts another data-parallel rank contributes
    seen = []

    def all_reduce(c):
        seen.append(c.clone())
        return c + other_rank

    lbl_mod.sum_counts = all_reduce
    running = torch.zeros(E)
    for micro in range(2):
        logits, probs, idx = random_routing(T, E, K)
        lbl, counts = lbl_mod(probs, idx)
        local = torch.bincount(idx.flatten(), minlength=E)
        assert torch.equal(seen[-1], local) and torch.equal(counts, local)
        running += local + other_rank
        f = running / running.sum()
        torch.testing.assert_close(lbl, E * (f * probs.mean(0)).sum())
        # p keeps its local gradient, f none
        g, = torch.autograd.grad(lbl, probs)
        torch.testing.assert_close(g, (E * f / T).expand(T, E))
    lbl_mod.reset()
    _, probs, idx = random_routing(T, E, K)
    lbl, _ = lbl_mod(probs, idx)
    c = torch.bincount(idx.flatten(), minlength=E) + other_rank
    torch.testing.assert_close(lbl, E * ((c / c.sum()) * probs.mean(0)).sum())


def test_global_scope_matches_megatron_running_mean():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, E, K = 12, 4, 2
    lbl_mod = LoadBalancingLoss(E, "global")
    running = torch.zeros(E)
    for step in range(1, 4):
        logits, probs, idx = random_routing(T, E, K)
        lbl, counts = lbl_mod(probs, idx)
        running += counts
        ref = moe_utils.switch_load_balancing_loss_func(
            probs=probs, tokens_per_expert=running / step, total_num_tokens=T, topk=K,
            num_experts=E, moe_aux_loss_coeff=1.0)
        torch.testing.assert_close(lbl, ref)


def test_global_scope_does_not_accumulate_in_eval():
    E = 4
    lbl_mod = LoadBalancingLoss(E, "global").eval()
    _, probs, idx = random_routing(8, E, 2)
    lbl_mod(probs, idx)
    assert lbl_mod.step_counts_E.sum() == 0


def test_bad_scope_is_refused():
    from moetrain.config import ConfigError, compose

    with pytest.raises(ConfigError) as info:
        compose(["model.moe.lbl.scope=batch"])
    assert "model.moe.lbl.scope" in str(info.value)


def test_attach_aux_loss_gradient():
    w = torch.randn(3, requires_grad=True)
    h = w * 2.0
    aux = (w ** 2).sum()
    out = AttachAuxLoss.apply(h, aux, 0.5)
    torch.testing.assert_close(out, h)
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2.0 + 0.5 * 2 * w.detach())
