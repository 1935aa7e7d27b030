"""Context parallelism against the single-process computation (forked gloo ranks, fp32).

One 4-rank launch checks, on every rank, for CP groups of size 2 ({0,1}, {2,3}) and 4:
- causal GQA attention, both `cp_comm` modes: the local output and dq/dk/dv after backward
  equal this rank's slices of the unsplit SDPA and its gradients;
- a whole tiny `Transformer` (the tiny experiment's model, same seed everywhere) with
  `apply_context_parallel`, run on CP-sharded tokens and positions: logits equal the slices
  of the single-process logits, the MoE routing statistics summed over CP equal the
  single-process ones, and the parameter gradients of the local LM loss (+ the MoE aux losses,
  wired the way the parallel code must wire them under CP) summed over CP equal the
  single-process gradients.
The same launch repeats the Transformer check with TP=2 x CP=2 (DTensor TP + CP).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.config.schema import CPComm
from moetrain.model import Transformer, moe_layers
from moetrain.parallel.context_parallel import (
    ContextParallelAttention,
    apply_context_parallel,
    shard_positions,
    shard_sequence,
)
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.mesh import build_meshes
from moetrain.parallel.tensor_parallel import apply_tensor_parallel
from tests.harness import run_distributed, tiny_model_config
from tests.model.tiny import step_rows

TOL = 1e-5
B, S = 2, 32
HQ, HKV, HEAD_DIM = 8, 2, 16
WORLD = 4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the scale of the tensor, so near-zero entries are fine)."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------- pure helpers


def test_zigzag_layout_is_a_balanced_permutation():
    for cp in (1, 2, 3, 4):
        S_ = 8 * cp
        shards = [shard_positions(S_, r, cp) for r in range(cp)]
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(S_))
        # causal work per rank = sum over local queries of visible keys: equal on every rank
        work = {int((p + 1).sum()) for p in shards}
        assert len(work) == 1, (cp, work)
        x = torch.randn(3, S_, 5)
        for r in range(cp):
            assert torch.equal(shard_sequence(x, r, cp), x[:, shards[r]])
            assert torch.equal(shard_sequence(x.transpose(0, 1), r, cp, dim=0),
                               x.transpose(0, 1)[shards[r]])
    with pytest.raises(ValueError, match="divisible by 2\\*cp"):
        shard_sequence(torch.zeros(1, 12), 0, 4)


# ---------------------------------------------------------------------------- distributed


def _groups(rank: int) -> dict[int, dist.ProcessGroup]:
    """This rank's CP group of each size; every rank creates every group (collective)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return {2: pairs[rank // 2], 4: dist.new_group(list(range(WORLD)))}


def _attention_checks(group: dist.ProcessGroup, comm: str, batch_positions: bool) -> dict:
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(1234)  # same full tensors on every rank
    q = torch.randn(B, HQ, S, HEAD_DIM, generator=gen, requires_grad=True)
    k = torch.randn(B, HKV, S, HEAD_DIM, generator=gen, requires_grad=True)
    v = torch.randn(B, HKV, S, HEAD_DIM, generator=gen, requires_grad=True)
    w = torch.randn(B, HQ, S, HEAD_DIM, generator=gen)  # loss = sum(out * w), separable by token
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (out * w).sum().backward()

    positions = shard_positions(S, r, cp)
    if batch_positions:  # [B, S/cp] with a per-sequence offset: the mask must not change
        positions = positions + torch.tensor([[0], [100]])
    ql, kl, vl = (shard_sequence(t.detach(), r, cp, dim=2).requires_grad_() for t in (q, k, v))
    out_l = ContextParallelAttention(group, comm)(ql, kl, vl, positions)
    (out_l * shard_sequence(w, r, cp, dim=2)).sum().backward()
    errs = {"out": rel_err(out_l, shard_sequence(out, r, cp, dim=2))}
    for name, local, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        errs[name] = rel_err(local.grad, shard_sequence(full.grad, r, cp, dim=2))
    return errs


def _wire_moe(model, group: dist.ProcessGroup, shards: int) -> None:
    """What the parallel code must do under CP: each rank's aux losses are its share of the
    micro-batch's, and the LBL expert counts are summed over the ranks splitting the sequence."""
    def reduce(counts):
        out = counts.clone()
        dist.all_reduce(out, group=group)
        return out

    for layer in moe_layers(model):
        layer.use_layout(token_shards=shards, sum_counts=reduce)


def _reference(cfg, tokens, targets):
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    logits = ref(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    stats = step_rows(ref)
    counts, lbl = stats.tokens_per_expert.sum(0), stats.scalar("lbl").sum()
    return model, logits.detach(), grads, counts, lbl


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, group=group)
    return out


def _transformer_checks(cfg, group, comm, tokens, targets, reference) -> dict:
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    model0, ref_logits, ref_grads, ref_counts, ref_lbl = reference
    model = copy.deepcopy(model0)
    apply_context_parallel(model, group, comm)
    _wire_moe(model, group, cp)
    positions = shard_positions(S, r, cp)
    logits = model(shard_sequence(tokens, r, cp), positions)
    loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(targets, r, cp).flatten(),
                           reduction="sum")
    loss.backward()
    stats = step_rows(model)
    errs = {
        "logits": rel_err(logits.detach(), shard_sequence(ref_logits, r, cp)),
        "loss": rel_err(_sum_over(loss.detach(), group),
                        F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(),
                                        reduction="sum")),
        "expert_counts": rel_err(_sum_over(stats.tokens_per_expert.sum(0), group).float(),
                                 ref_counts.float()),
        "lbl": rel_err(_sum_over(stats.scalar("lbl").sum(), group), ref_lbl),
    }
    errs["grads"] = max(
        rel_err(_sum_over(p.grad, group), ref_grads[n]) for n, p in model.named_parameters()
    )
    return errs


def _cp_rank_main(rank, world, cfg):
    groups = _groups(rank)
    results = {}
    t0 = time.perf_counter()
    for cp, group in groups.items():
        for comm in CPComm.values():
            for batch_positions in (False, True):
                key = f"attention cp={cp} {comm}" + (" [B,S] positions" if batch_positions else "")
                results[key] = _attention_checks(group, comm, batch_positions)
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    reference = _reference(cfg, tokens, targets)
    for cp, group in groups.items():
        for comm in CPComm.values():
            results[f"transformer cp={cp} {comm}"] = _transformer_checks(
                cfg, group, comm, tokens, targets, reference)
    return results, {"attention_s": t1 - t0, "transformer_s": time.perf_counter() - t1}


def _report(all_results, timings=None):
    worst: dict[str, float] = {}
    for results in all_results:
        for case, errs in results.items():
            for name, err in errs.items():
                worst[f"{case}: {name}"] = max(worst.get(f"{case}: {name}", 0.0), err)
    for key, err in worst.items():
        print(f"{key}: {err:.2e}")
    if timings:
        print("timings (rank 0):", timings)
    bad = {k: e for k, e in worst.items() if not e < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def _rank_main(rank, world, cfg):
    """Both checks in one launch: CP alone, then TP x CP (its own meshes)."""
    return _cp_rank_main(rank, world, cfg), _tp_cp_rank_main(rank, world, cfg)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_rank_main, WORLD, tiny_model_config(), timeout=240)


def test_context_parallel_matches_single_process(four_ranks):
    out = [cp for cp, _ in four_ranks]
    _report([res for res, _ in out], out[0][1])


# ---------------------------------------------------------------------------- TP x CP


def _tp_cp_rank_main(rank, world, cfg):
    dims = ParallelDims(world, tp=2, cp=2)
    meshes = build_meshes(dims, "cpu")
    cp_group = meshes.group("cp")
    shard_group = meshes.group("dp_cp_tp")  # = the cp x tp ranks of one micro-batch (dp = 1)
    r, cp = meshes.local_rank("cp"), dims.cp
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    model0, ref_logits, ref_grads, _, _ = _reference(cfg, tokens, targets)
    results = {}
    for comm in CPComm.values():
        model = copy.deepcopy(model0)
        apply_tensor_parallel(model, meshes.mesh("tp"))
        apply_context_parallel(model, cp_group, comm)
        _wire_moe(model, shard_group, dims.tp * dims.cp)
        logits = model(shard_sequence(tokens, r, cp), shard_positions(S, r, cp)).full_tensor()
        F.cross_entropy(logits.flatten(0, 1), shard_sequence(targets, r, cp).flatten(),
                        reduction="sum").backward()
        errs = {"logits": rel_err(logits.detach(), shard_sequence(ref_logits, r, cp))}
        worst = 0.0
        for n, p in model.named_parameters():
            if hasattr(p.grad, "full_tensor"):  # TP DTensor: its grad covers the TP group's tokens
                g = _sum_over(p.grad.full_tensor(), cp_group)
            else:  # MoE weights stay plain: each rank's grad covers its S/(tp cp) positions
                g = _sum_over(p.grad, shard_group)
            worst = max(worst, rel_err(g, ref_grads[n]))
        errs["grads"] = worst
        results[f"tp=2 x cp=2 {comm}"] = errs
    return results


def test_context_parallel_with_tensor_parallel(four_ranks):
    _report([tp_cp for _, tp_cp in four_ranks])
