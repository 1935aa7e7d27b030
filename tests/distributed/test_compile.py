"""train.compile=true (regional torch.compile of every block) trains like eager: the real
Trainer on one process and on tp2 x ep2 (EP folded over TP: DTensor TP and the all-to-all
inside compiled blocks) equals the eager single-process run to rel. 1e-5 (2-layer model: one
dense and one MoE block, to keep compile time in CI small). A MoE block under the sync-free
exchange compiles with fullgraph=True (no graph break: nothing read on the host)."""

from __future__ import annotations


from moetrain.model import Transformer
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import apply_expert_parallel
from moetrain.parallel.mesh import build_meshes
from tests.distributed.equivalence import Layout, check_case, layouts_fixture
from tests.harness import run_distributed
from tests.model.tiny import control, make_cfg

COMPILE = ("train.compile=true",)
ONE_RANK = {"compiled": Layout(COMPILE, "b4-l2")}
TWO_RANKS = {"tp2-ep2-compiled": Layout(("parallel.tp=2", "parallel.ep=2", *COMPILE), "b4-l2")}


one_rank = layouts_fixture(1, ONE_RANK)


two_ranks = layouts_fixture(2, TWO_RANKS)


def test_compiled_one_process_equals_eager(one_rank, references):
    check_case(one_rank, "compiled", ONE_RANK["compiled"], references)


def test_compiled_tp2_ep2_equals_eager_one_process(two_ranks, references):
    check_case(two_ranks, "tp2-ep2-compiled", TWO_RANKS["tp2-ep2-compiled"], references)


# -- a MoE block under the sync-free exchange: one graph -------------------------------------------

def _compile_moe_block(rank, world_size):
    """A MoE block (attention + MoE layer) under ep2 with the sync-free exchange, compiled with
    fullgraph=True (any graph break - a host read, a data-dependent shape - raises): forward and
    backward equal eager; a second batch of the same shape runs the same graph (no
    recompilation). (With model.moe.ep_overlap the compiled block runs the pieces one after the
    other: the same graph with two exchanges; one compile here keeps the test short.)"""
    import torch._dynamo

    meshes = build_meshes(ParallelDims(world_size, ep=world_size), "cpu")
    results = {}
    for overlap in (False,):
        cfg = make_cfg(moe=dict(num_experts=8, top_k=2, expert_hidden=16, ep_budget=2.0,
                                ep_overlap=overlap, num_shared_experts=1),
                       lbl=dict(coeff=0.01), d_model=32, n_layers=1)
        torch.manual_seed(0)
        model = apply_expert_parallel(Transformer(cfg), meshes.experts, sync_free=True)
        control(model, cfg.moe).start_step(0)
        block = model.layers["0"]
        gen = torch.Generator().manual_seed(rank)
        batches = [torch.randn(2, 8, 32, generator=gen) for _ in range(2)]
        positions = torch.arange(8)

        def run(fn, h):
            h = h.clone().requires_grad_()
            y = fn(h, positions)
            y.square().sum().backward()
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                     for p in block.parameters()]
            out = [y.detach(), h.grad] + [g.clone() for g in grads]
            block.zero_grad(set_to_none=True)
            return out

        eager = [run(block, h) for h in batches]
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        got = [run(compiled, batches[0])]
        with torch._dynamo.config.patch(error_on_recompile=True):
            got.append(run(compiled, batches[1]))
        results[overlap] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                               for e, g in zip(eager, got) for a, b in zip(g, e))
    return results


def test_a_moe_block_under_sync_free_expert_parallelism_compiles_to_one_graph():
    for per_rank in run_distributed(_compile_moe_block, 2, timeout=600):
        assert all(err < 1e-5 for err in per_rank.values()), per_rank
