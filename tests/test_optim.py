import math

import pytest
import torch

from moetrain.config import ConfigError, compose, to_object
from moetrain.config.schema import OptimConfig
from moetrain.model import Transformer
from moetrain.optim import build_optimizer, lr_at, route_parameters
from moetrain.optim.muon import Muon, newton_schulz, rms_scale


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


def _model(*overrides):
    cfg = to_object(compose(["+experiment=tiny", "model.n_layers=2", "model.vocab_size=64",
                             "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_hidden=48", "model.moe.expert_hidden=16", *overrides]))
    torch.manual_seed(0)
    return Transformer(cfg.model)


MLA = ["model.attention=mla", "model.n_kv_heads=4", "model.mla.q_lora_rank=16",
       "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
       "model.mla.v_head_dim=8"]


@pytest.mark.parametrize("overrides", [[], ["model.moe.num_shared_experts=1",
                                            "model.moe.shared_expert_gate=true", *MLA,
                                            "model.mtp.depth=1"]])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(overrides):
    model = _model(*overrides)
    muon, adamw = route_parameters(model)
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    assert "layers.1.moe.experts.w1" in muon_names and "layers.0.mlp.w2.weight" in muon_names
    assert {"tok_embeddings.weight", "output.weight", "norm.weight",
            "layers.1.moe.router.weight"} <= adamw_names
    assert all(".attention.w" in n or ".mlp." in n or "experts.w" in n or ".eh_proj." in n
               for n in muon_names)
    assert not any(".attention.w" in n for n in adamw_names)  # every projection is Muon's
    if overrides:
        assert {"layers.1.attention.wq_b.weight", "layers.1.attention.wkv_a.weight",
                "layers.1.moe.shared_experts.w3.weight"} <= muon_names
        assert {"layers.1.attention.kv_a_norm.weight", "layers.1.moe.shared_expert_gate.weight"} \
            <= adamw_names
        # the multi-token prediction module: its block like a layer's, its projection Muon's
        assert {"mtp.0.eh_proj.weight", "mtp.0.block.attention.wq_b.weight",
                "mtp.0.block.moe.experts.w2"} <= muon_names
        assert {"mtp.0.enorm.weight", "mtp.0.block.moe.router.weight",
                "mtp.0.block.moe.shared_expert_gate.weight"} <= adamw_names
    assert len(muon) + len(adamw) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_planners_state_bytes_are_what_each_parameter_allocates(name):
    """planning.optimizer_state_bytes (the planner's one hook, answered by moetrain.optim's
    routing rules) against the state a real step allocates for every parameter (AdamW's 0-d
    step counter aside), MLA and a shared gate too."""
    from moetrain.plan_shards import ParamSpec
    from moetrain.planning import optimizer_state_bytes

    model = _model("model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true", *MLA,
                   "model.mtp.depth=1")
    cfg = OptimConfig(name=name)
    opt = build_optimizer(model, cfg)
    tokens = torch.randint(0, 64, (2, 9))
    logits = model(tokens[:, :8], mtp_tokens=tokens[:, 1:, None])  # every parameter gets a grad
    sum(x.float().square().mean() for x in logits).backward()
    opt.step()
    for n, p in model.named_parameters():
        held = sum(t.numel() * t.element_size() for t in opt.state[p].values()
                   if isinstance(t, torch.Tensor) and t.ndim > 0)
        spec = ParamSpec(n, tuple(p.shape), "", "")
        assert held == optimizer_state_bytes(cfg, spec) * p.numel(), n


def test_a_parameter_neither_optimizer_takes_is_refused_by_name():
    model = _model()
    model.layers["1"].moe.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3, 3)))
    with pytest.raises(ConfigError, match=r"layers\.1\.moe\.extra_scale \[3, 3\] is neither"):
        build_optimizer(model, OptimConfig(name="muon"))


def test_muon_on_one_process_is_torch_muon_on_each_matrix_and_adamw_on_the_rest():
    """One step of build_optimizer's Muon against torch.optim.Muon on every matrix (each
    expert's slice separately) and torch.optim.AdamW on the rest, from the same gradients."""
    model = _model()
    cfg = OptimConfig(name="muon", lr=0.02, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for _ in range(2):  # the second step uses the momentum buffers
        opt.step()
    muon_names = {n for n, _ in route_parameters(model)[0]}
    views, rest = [], {}
    for n, w in copies.items():
        if n in muon_names:
            for e, v in enumerate(w.unbind(0) if w.ndim == 3 else [w]):
                v.grad = grads[n][e] if w.ndim == 3 else grads[n]
                views.append(v)
        else:
            w.grad = grads[n]
            rest[n] = w
    ref_muon = torch.optim.Muon(views, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW(
        [{"params": [w for w in rest.values() if w.ndim >= 2], "weight_decay": 0.1},
         {"params": [w for w in rest.values() if w.ndim < 2], "weight_decay": 0.0}],
        lr=0.02, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(2):
        ref_muon.step()
        ref_adamw.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), copies[n]), n


def test_newton_schulz_in_fp32_orthogonalises_like_the_exact_iteration():
    """The fp32 loop (optim.ns_dtype=fp32) against the same quintic iteration in float64."""
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    a, b, c = 3.4445, -4.7750, 2.0315
    X = (G / G.norm()).double()
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    got = newton_schulz(G, 5, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), X, rtol=0, atol=1e-5)
    assert torch.allclose(newton_schulz(G.T, 5, dtype=torch.float32).double(), X.T, atol=1e-5)
    # bf16, torch's function: the same matrix to bf16 precision
    assert torch.allclose(newton_schulz(G, 5).double(), X, atol=3e-2)


def test_ns_dtype_fp32_steps_with_the_fp32_iteration():
    """optim.ns_dtype=fp32 through build_optimizer: the first step of one matrix is
    w (1 - lr wd) - lr 0.2 sqrt(max(m, n)) NS(nesterov update), NS the quintic iteration in
    float64 here (bf16 Newton-Schulz is ~3e-2 off)."""
    model = torch.nn.Module()  # one Muon matrix, named as a layer's MLP projection
    model.layers = torch.nn.ModuleDict({"0": torch.nn.Module()})
    model.layers["0"].mlp = torch.nn.Module()
    model.layers["0"].mlp.w1 = torch.nn.Linear(40, 24, bias=False)
    w = model.layers["0"].mlp.w1.weight
    with torch.no_grad():
        w.copy_(torch.randn(24, 40, generator=torch.Generator().manual_seed(2)))
    start = w.detach().clone().double()
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    w.grad = g.clone()
    lr, wd, mu = 0.02, 0.1, 0.9
    opt = build_optimizer(model, OptimConfig(name="muon", lr=lr, weight_decay=wd, momentum=mu,
                                             ns_dtype="fp32"))
    opt.step()
    update = g.double().lerp((1 - mu) * g.double(), mu)  # Nesterov: g + mu (buf - g)
    X = update / update.norm()
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    want = start * (1 - lr * wd) - lr * 0.2 * math.sqrt(40) * X
    torch.testing.assert_close(w.detach().double(), want, rtol=0, atol=1e-6)


def test_the_update_is_scaled_to_adamw_rms():
    assert rms_scale((128, 512)) == pytest.approx(0.2 * math.sqrt(512))
    assert rms_scale((8, 384, 128)) == pytest.approx(0.2 * math.sqrt(384))  # a stack's matrices


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
