import math

import pytest
import torch

from moetrain.config.schema import OptimConfig
from moetrain.optim import build_optimizer, lr_at


def test_warmup_then_cosine_hits_the_hand_computed_values():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, decay="cosine")
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # after warmup: progress = (step - 4) / 10
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg, 14) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    assert lr_at(100, cfg, 14) == pytest.approx(0.1)  # stays at the floor


def test_linear_and_constant_decay():
    lin = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, decay="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == [2.0, 1.5, 1.0, 0.5, 0.0]
    const = OptimConfig(lr=2.0, warmup_steps=2, decay="constant")
    assert [lr_at(s, const, 4) for s in range(4)] == [1.0, 2.0, 2.0, 2.0]


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert len(plain["params"]) == 3  # linear bias, norm weight, norm bias


def test_adamw_first_step_uses_the_configured_eps():
    """First AdamW step (bias-corrected m = g, v = g^2): w -= lr * g / (|g| + eps), by hand; an
    eps of 0.5 makes the configured value visible (the default 1e-8 would not be)."""
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = build_optimizer(model, OptimConfig(lr=0.1, eps=0.5, weight_decay=0.0))
    g = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    model.weight.grad = g.clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), 1.0 - 0.1 * g / (g.abs() + 0.5))
