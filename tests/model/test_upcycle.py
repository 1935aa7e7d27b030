import copy

import pytest
import torch

from moetrain.model import Transformer
from moetrain.model.upcycle import UpcycleError, upcycle_
from tests.model.tiny import make_cfg


def dense_model():
    cfg = make_cfg(moe=dict(first_dense_layers=2), n_layers=2, ffn_hidden=32)
    torch.manual_seed(0)
    return Transformer(cfg)


def moe_model(**moe):
    cfg = make_cfg(moe={**dict(num_experts=4, top_k=2, expert_hidden=32, first_dense_layers=1), **moe},
                   n_layers=2, ffn_hidden=32)
    torch.manual_seed(1)
    return Transformer(cfg), cfg


def test_upcycled_model_reproduces_the_dense_output_for_any_routing():
    dense = dense_model()
    model, _ = moe_model()
    router_before = model.layers["1"].moe.router.weight.clone()
    upcycle_(model, dense.state_dict())
    tokens = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.layers["1"].moe.router.weight, router_before)  # router stays fresh
    assert torch.equal(model.layers["0"].mlp.w1.weight, dense.layers["0"].mlp.w1.weight)


def test_fine_grained_upcycling_splits_the_mlp_and_scales_the_output():
    dense = dense_model()
    model, cfg = moe_model(expert_hidden=16)
    cfg.moe.routing.bias_rate = 1e-3  # so the expert bias takes part in selection
    model = Transformer(cfg)
    upcycle_(model, dense.state_dict(), granularity=2)
    experts, mlp = model.layers["1"].moe.experts, dense.layers["1"].mlp
    assert torch.equal(experts.w1[3], mlp.w1.weight[16:].t())  # expert 3 = slice 1
    torch.testing.assert_close(experts.w2[2], mlp.w2.weight[:, :16].t() * 2)
    router = model.layers["1"].moe.router
    with torch.no_grad():  # uniform scores; the bias picks one copy of each slice: experts 0, 1
        router.weight.zero_()
        router.expert_bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    tokens = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(model(tokens), dense(tokens), rtol=1e-5, atol=1e-5)


def test_shapes_that_do_not_fit_are_refused_with_the_key():
    dense = dense_model()
    model, _ = moe_model(expert_hidden=16)
    with pytest.raises(UpcycleError, match="model.moe.expert_hidden=16.*granularity=1"):
        upcycle_(model, dense.state_dict())
    state = copy.deepcopy(dense.state_dict())
    del state["layers.1.mlp.w3.weight"]
    model, _ = moe_model()
    with pytest.raises(UpcycleError, match="layers.1.mlp.w3.weight"):
        upcycle_(model, state)
