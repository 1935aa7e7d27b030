"""moetrain.parallel.tensor_parallel directly, on 2 gloo ranks: the placement of every weight,
logits and gradients equal to one process, and plain sequence shards at pipeline stage ends."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.tensor.parallel  # noqa: F401 - imported in the parent for the ranks
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from moetrain.model import Transformer
from moetrain.parallel.tensor_parallel import apply_tensor_parallel
from tests.distributed.launcher import run_distributed
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


def test_tensor_parallel_placements_and_equivalence():
    model = _model()
    tokens = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(model)
    logits = ref(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten(), reduction="sum")
    loss.backward()
    results = run_distributed(_tp2, 2, model, tokens, timeout=90)
    placements, logit_placements, tp_logits, tp_loss, grads, out_type, out_shape = results[0]
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
