import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moetrain.model import Transformer
from moetrain.model.moe import MoELayer
from moetrain.model.moe.capacity import capacity_keep_mask, expert_capacity
from tests.model.tiny import layer_stats, make_cfg, start_step, step_rows


def make_layer(**moe):
    lbl = moe.pop("lbl", None)
    cfg = make_cfg(moe=moe, lbl=lbl)
    layer = MoELayer(cfg.d_model, cfg.moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def naive_moe(layer: MoELayer, x_BSD, keep_TK=None):
    """Per token and selected expert: y[t] = sum_j keep * w[t,j] * SwiGLU_e(x[t]) + shared."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    logits = x_TD @ layer.router.weight.T
    scores = logits.softmax(-1) if layer.score_func == "softmax" else logits.sigmoid()
    top_s, top_i = scores.topk(layer.top_k, dim=-1)
    if layer.router.norm_topk_prob:
        top_s = top_s / top_s.sum(-1, keepdim=True)
    ex = layer.experts
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(x_TD.shape[1])
        for j in range(layer.top_k):
            if keep_TK is not None and not keep_TK[t, j]:
                continue
            e = int(top_i[t, j])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            y = y + top_s[t, j] * (h @ ex.w2[e])
        if layer.shared_experts is not None:
            y = y + layer.shared_experts(x_TD[t])
        rows.append(y)
    return torch.stack(rows).view_as(x_BSD), scores, top_i


@pytest.mark.parametrize("moe", [
    dict(),
    dict(score_func="sigmoid", top_k=3),
    dict(num_shared_experts=2, shared_expert_hidden=8, norm_topk_prob=False),
])
def test_dropless_layer_equals_per_token_loop(moe):
    layer = make_layer(**moe)
    x = torch.randn(2, 5, 32)
    expected, _, _ = naive_moe(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    stats = layer_stats(layer)
    assert stats.dropped == 0 and stats.assignments == 10 * layer.top_k
    assert stats.tokens_per_expert.sum() == 10 * layer.top_k


@pytest.mark.parametrize("pad", [False, True])
def test_capacity_dropping_equals_loop_without_dropped(pad):
    layer = make_layer(capacity_factor=0.5, pad_to_capacity=pad)
    x = torch.randn(2, 8, 32)
    out = layer(x)
    _, scores, top_i = naive_moe(layer, x)
    C = expert_capacity(16, 2, 4, 0.5)
    keep = capacity_keep_mask(top_i, scores.gather(1, top_i), 4, C)
    expected, _, _ = naive_moe(layer, x, keep)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    stats = layer_stats(layer)
    assert stats.dropped == (~keep).sum() > 0
    # per expert at most C kept; dropped fraction is dropped / (T k)
    kept_per_expert = torch.bincount(top_i[keep], minlength=4)
    assert kept_per_expert.max() <= C
    assert math.isclose(float(stats.dropped) / stats.assignments, (~keep).float().mean().item())


def _explicit_aux(model, x_tokens, coeff, z_coeff):
    """Run the model capturing each router's output; compute the aux losses by hand."""
    captured = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: captured.append(out))
             for m in model.modules() if isinstance(m, MoELayer)]
    logits = model(x_tokens)
    for h in hooks:
        h.remove()
    aux = 0.0
    for r in captured:
        T, E = r.scores_TE.shape
        f = torch.bincount(r.topk_idx_TK.flatten(), minlength=E).float() / r.topk_idx_TK.numel()
        lbl = E * (f * r.scores_TE.mean(0)).sum()
        z = (torch.logsumexp(r.logits_TE, -1) ** 2).mean()
        aux = aux + coeff * lbl + z_coeff * z
    return logits, aux


def test_aux_loss_injection_equals_explicit_aux_gradient():
    cfg = make_cfg(moe=dict(first_dense_layers=1, z_loss_coeff=0.01), lbl=dict(coeff=0.1),
                   n_layers=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    s = 0.37
    torch.manual_seed(1)
    injected = Transformer(cfg)
    explicit = Transformer(cfg)
    explicit.load_state_dict(injected.state_dict())

    start_step(injected, aux_loss_scale=s)
    injected(tokens).sum().backward()

    start_step(explicit, aux_loss_scale=0.0)
    logits, aux = _explicit_aux(explicit, tokens, 0.1, 0.01)
    (logits.sum() + s * aux).backward()

    for (name, a), b in zip(injected.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the aux losses really moved the router gradient
    start_step(explicit, aux_loss_scale=0.0)
    explicit.zero_grad()
    explicit(tokens).sum().backward()
    router = "layers.1.moe.router.weight"
    assert not torch.allclose(dict(injected.named_parameters())[router].grad,
                              dict(explicit.named_parameters())[router].grad)


def test_no_aux_attached_without_grad():
    layer = make_layer()
    with torch.no_grad():
        y = layer(torch.randn(1, 4, 32))
    assert y.grad_fn is None and layer_stats(layer).tokens == 4


def test_global_lbl_through_layers_over_two_micro_batches():
    layer = make_layer(lbl=dict(scope="global", coeff=1.0))
    xs = [torch.randn(2, 4, 32) for _ in range(2)]
    running = torch.zeros(4)
    for x in xs:
        before = step_rows(layer).rows_LC
        layer(x)
        stats = layer_stats(layer, since=before)
        running += stats.tokens_per_expert
        with torch.no_grad():
            scores = (x.reshape(-1, 32) @ layer.router.weight.T).softmax(-1)
        expected = 4 * ((running / running.sum()) * scores.mean(0)).sum()
        torch.testing.assert_close(stats.lbl.float(), expected)
    start_step(layer, aux_loss_scale=1.0)
    assert layer.lbl.step_counts_E.sum() == 0 and layer.step_stats.abs().sum() == 0


def test_activation_checkpointing_replays_global_lbl():
    """Recomputing a checkpointed layer inside backward must see the same f as its forward."""
    grads = []
    xs = [torch.randn(2, 4, 32) for _ in range(2)]
    for use_ckpt in (False, True):
        torch.manual_seed(5)
        layer = make_layer(lbl=dict(scope="global", coeff=1.0))
        start_step(layer, aux_loss_scale=1.0)
        outs = []
        for x in xs:  # two forwards, then the backwards (like a pipeline schedule)
            outs.append(checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x))
        torch.autograd.backward([o.sum() for o in outs])
        grads.append([p.grad.clone() for p in layer.parameters()])
        assert layer.lbl.step_counts_E.sum() == 2 * 8 * 2  # recompute did not accumulate again
        assert layer_stats(layer).tokens == 2 * 8  # nor record its statistics again
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_with_no_tokens(capacity_factor):
    layer = make_layer(capacity_factor=capacity_factor, num_shared_experts=1)
    x = torch.randn(2, 0, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 32)
    y.sum().backward()
    assert layer_stats(layer).tokens_per_expert.tolist() == [0, 0, 0, 0]
