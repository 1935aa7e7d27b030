"""The MoE layer with model.moe.kernels=triton equals it with torch: output, every gradient,
with capacity dropping and token rounding (the Triton kernels through the interpreter on CPU)."""

import copy

import pytest
import torch

from moetrain.model.moe import MoELayer
from tests.kernels.conftest import DEVICE
from tests.model.tiny import make_cfg


@pytest.mark.parametrize("moe", [dict(), dict(capacity_factor=0.75, token_rounding=2),
                                 dict(capacity_factor=1.0, pad_to_capacity=True)])
def test_layer_on_triton_kernels_equals_torch(moe):
    torch.manual_seed(0)
    cfg = make_cfg(moe=dict(num_experts=4, top_k=2, expert_hidden=16, **moe))
    ref = MoELayer(cfg.d_model, cfg.moe).to(DEVICE)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, cfg.d_model, device=DEVICE)
    results = {}
    for kernels in ("torch", "triton"):
        layer = copy.deepcopy(ref)
        layer.dispatcher.kernels = layer.experts.kernels = kernels
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.square().sum().backward()
        results[kernels] = [y.detach(), xl.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        # silu through numpy in the interpreter: a few elements differ in the last bits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
