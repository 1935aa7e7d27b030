"""moetrain.parallel.tensor_parallel directly, on 2 gloo ranks: the placement of every weight,
logits and gradients equal to one process, and plain sequence shards at pipeline stage ends."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor.parallel  # noqa: F401 - imported in the parent for the ranks
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.model import Transformer
from moetrain.parallel.tensor_parallel import apply_tensor_parallel
from tests.harness import run_distributed
from tests.model.tiny import make_cfg

B, S = 2, 8


def _model():
    # No aux losses: under TP each rank's are shares the parallel context wires (use_layout);
    # here TP alone is under test.
    torch.manual_seed(0)
    cfg = make_cfg(moe=dict(first_dense_layers=1), lbl=dict(coeff=0.0), vocab_size=64,
                   n_layers=3)
    return Transformer(cfg)


def _placements(model) -> dict[str, object]:
    return {n: (p.placements if isinstance(p, DTensor) else "plain")
            for n, p in model.named_parameters()}


def _tp2(rank, world_size, model, tokens):
    mesh = init_device_mesh("cpu", (world_size,))
    model = apply_tensor_parallel(copy.deepcopy(model), mesh)
    placements = _placements(model)
    with loss_parallel():
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten(),
                               reduction="sum")
        loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        if isinstance(p.grad, DTensor):
            grads[n] = p.grad.full_tensor()
        else:  # MoE weights stay plain: each TP rank routed its own positions
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[n] = g
    # a middle pipeline stage: no embedding, no output head; its ends carry plain shards
    torch.manual_seed(1)
    shard = torch.randn(B, S // world_size, model.cfg.d_model)
    stage_out = apply_tensor_parallel(_stage(model.cfg), mesh)(shard)
    return (placements, logits.placements, logits.full_tensor(), float(loss.to_local()), grads,
            type(stage_out).__name__, tuple(stage_out.shape))


def _stage(cfg):
    torch.manual_seed(0)
    stage = Transformer(cfg)
    stage.tok_embeddings, stage.norm, stage.output = None, None, None
    return stage


def _tokens():
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(2))


def _both(rank, world_size, model, models, tokens):
    return _tp2(rank, world_size, model, tokens), _tp2_variants(rank, world_size, models, tokens)


@pytest.fixture(scope="module")
def two_ranks():
    """One 2-rank launch for both tests: (the model, the variants, their results by rank)."""
    model, models = _model(), {name: _variant(name) for name in VARIANTS}
    return model, models, run_distributed(_both, 2, model, models, _tokens(), timeout=150)


def test_tensor_parallel_placements_and_equivalence(two_ranks):
    model, _, results = two_ranks
    tokens = _tokens()
    ref = copy.deepcopy(model)
    logits = ref(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten(), reduction="sum")
    loss.backward()
    placements, logit_placements, tp_logits, tp_loss, grads, out_type, out_shape = results[0][0]
    colwise, rowwise = (Shard(0),), (Shard(1),)
    assert placements["tok_embeddings.weight"] == colwise  # vocab-parallel rows
    assert placements["output.weight"] == colwise  # colwise over the vocabulary
    assert placements["layers.0.attention.wq.weight"] == colwise
    assert placements["layers.0.attention.wk.weight"] == colwise
    assert placements["layers.0.attention.wo.weight"] == rowwise
    assert placements["layers.0.mlp.w1.weight"] == colwise
    assert placements["layers.0.mlp.w2.weight"] == rowwise
    assert placements["layers.0.attention_norm.weight"] == (Replicate(),)
    assert placements["layers.1.moe.router.weight"] == "plain"  # MoE: folded, not TP-sharded
    assert placements["layers.1.moe.experts.w1"] == "plain"
    assert logit_placements == (Shard(2),)  # the full [B, S, V] logits are never gathered
    torch.testing.assert_close(tp_logits, logits.detach(), rtol=1e-5, atol=1e-6)
    assert abs(tp_loss - float(loss.detach())) / float(loss.detach()) < 1e-6
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # a middle stage takes and returns this rank's plain [B, S/tp, D] shard
    assert out_type == "Tensor" and out_shape == (B, S // 2, model.cfg.d_model)


# The attention variants of the real families: q/k norm per head (Qwen3) and over the whole
# projection (OLMoE), multi-head latent attention with full and low-rank queries (DeepSeek).
VARIANTS = {
    "qk-norm-head": dict(qk_norm="head"),
    "qk-norm-full": dict(qk_norm="full"),
    "mla": dict(attention="mla", n_kv_heads=4),
    "mla-q-lora": dict(attention="mla", n_kv_heads=4),
}


def _variant(name):
    from moetrain.config.schema import MLAConfig
    torch.manual_seed(0)
    cfg = make_cfg(moe=dict(first_dense_layers=1), lbl=dict(coeff=0.0), vocab_size=64,
                   n_layers=2, **VARIANTS[name])
    cfg.mla = MLAConfig(q_lora_rank=12 if name == "mla-q-lora" else None, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    model = Transformer(cfg)
    with torch.no_grad():  # norms away from one, so a wrongly sharded weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _tp2_variants(rank, world_size, models, tokens):
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for name, model in models.items():
        model = apply_tensor_parallel(copy.deepcopy(model), mesh)
        with loss_parallel():
            logits = model(tokens)
            F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten(),
                            reduction="sum").backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            if isinstance(g, DTensor):
                g = g.full_tensor()
            else:
                g = g.clone()
                dist.all_reduce(g)
            grads[n] = g
        out[name] = (_placements(model), logits.full_tensor(), grads)
    return out


def test_tensor_parallel_of_qk_norm_and_latent_attention(two_ranks):
    _, models, results = two_ranks
    tokens = _tokens()
    results = results[0][1]
    for name, model in models.items():
        ref = copy.deepcopy(model)
        logits = ref(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten(),
                        reduction="sum").backward()
        placements, tp_logits, grads = results[name]
        torch.testing.assert_close(tp_logits, logits.detach(), rtol=1e-5, atol=1e-6, msg=name)
        for n, p in ref.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6,
                                       msg=f"{name}: {n}")
    head, full = results["qk-norm-head"][0], results["qk-norm-full"][0]
    assert head["layers.0.attention.q_norm.weight"] == (Replicate(),)
    assert full["layers.0.attention.k_norm.weight"] == (Shard(0),)
    mla, lora = results["mla"][0], results["mla-q-lora"][0]
    assert mla["layers.0.attention.wq.weight"] == (Shard(0),)
    assert mla["layers.0.attention.wkv_b.weight"] == (Shard(0),)
    assert mla["layers.0.attention.wkv_a.weight"] == (Replicate(),)
    assert mla["layers.0.attention.wk_rope.weight"] == (Replicate(),)
    assert lora["layers.0.attention.wq_a.weight"] == (Replicate(),)
    assert lora["layers.0.attention.wq_b.weight"] == (Shard(0),)
