import copy

import pytest
import torch
import torch.nn.functional as F

from moetrain.model import MoELayer, Transformer
from moetrain.planning import count_parameters
from tests.model.tiny import control, make_cfg, step_rows


def test_forward_shapes_and_default_positions():
    cfg = make_cfg(moe=dict(first_dense_layers=1))
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, cfg.vocab_size)
    torch.testing.assert_close(logits, model(tokens, torch.arange(7)))
    assert model.layers["0"].mlp is not None and model.layers["0"].moe is None
    assert model.layers["1"].moe is not None and model.layers["1"].mlp is None
    assert step_rows(model).rows_LC.shape[0] == 1
    assert model.layers["1"].moe.moe_index == 0  # numbered among the MoE layers


def test_init_is_seeded_and_layer_independent():
    cfg = make_cfg(n_layers=3)
    torch.manual_seed(11)
    a = Transformer(cfg)
    torch.manual_seed(11)
    b = Transformer(cfg)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    b.init_weights(seed=3)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    a.init_weights(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # a pipeline stage holding only layer 2 initialises it exactly like the full model does
    stage = Transformer(cfg)
    del stage.layers["0"], stage.layers["1"]
    stage.tok_embeddings = None
    stage.init_weights(seed=3)
    for (n, p), q in zip(a.layers["2"].named_parameters(), stage.layers["2"].parameters()):
        assert torch.equal(p, q), n
    # norms are one, residual-writing projections get the smaller std
    assert torch.equal(a.norm.weight, torch.ones(cfg.d_model))
    wq, wo = a.layers["0"].attention.wq.weight, a.layers["0"].attention.wo.weight
    assert 0.015 < wq.std() < 0.025 and wo.std() < 0.7 * wq.std()
    assert a.layers["0"].moe.experts.w2.std() < 0.7 * a.layers["0"].moe.experts.w1.std()


def test_tied_embeddings():
    model = Transformer(make_cfg(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    untied = Transformer(make_cfg())
    model.init_weights(seed=5)
    untied.init_weights(seed=5)
    assert torch.equal(model.tok_embeddings.weight, untied.tok_embeddings.weight)
    assert count_parameters(model.cfg).n_total == sum(p.numel() for p in model.parameters())


def test_pipeline_stages_compose_to_full_model():
    cfg = make_cfg(n_layers=2)
    full = Transformer(cfg)
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    del first.layers["1"]
    first.norm = first.output = None
    del last.layers["0"]
    last.tok_embeddings = None
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    torch.testing.assert_close(last(first(tokens)), full(tokens))


def test_dense_only_model_has_no_moe_layers():
    model = Transformer(make_cfg(moe=dict(first_dense_layers=2), n_layers=2))
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    model(torch.randint(0, 61, (1, 4))).sum().backward()


def test_model_trains():
    cfg = make_cfg(moe=dict(first_dense_layers=1, z_loss_coeff=1e-3), lbl=dict(coeff=0.01))
    model = Transformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    moe = control(model, cfg.moe)
    for step in range(30):
        moe.start_step(step)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("mode", ["moe", "full"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    from moetrain.model import set_recompute

    cfg = make_cfg(moe=dict(first_dense_layers=1), lbl=dict(coeff=0.1), n_layers=3)
    cfg.moe.z_loss_coeff = 0.01
    torch.manual_seed(0)
    plain = Transformer(cfg)
    again = copy.deepcopy(plain)
    set_recompute(again, mode)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = []
    for model in (plain, again):
        model(tokens).logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)
    assert all(b.recompute == mode for b in again.layers.values())
