"""Expert parallelism against the single-process MoE layer (forked gloo ranks, fp32).

Every rank builds the same MoELayer, keeps a full copy as the reference, shards the other with
`apply_expert_parallel` and runs forward + backward on its own slice of one fixed token batch.
Per rank: outputs and input gradients equal the reference's rows; the router gradient summed
over all ranks and the expert gradients summed over EDP (ranks with the same expert shard and
other tokens) equal the reference's (sliced to this rank's experts / hidden columns).

References: dropless scenarios run the reference on the full batch; with a capacity factor the
capacity is per (rank, expert) by design, so the reference is the single-process layer run on
each rank's slice alone (gradients summed over the slices) - the drop decisions must be equal.

Byte accounting: every row the EP path moves goes through `expert_parallel.all_to_all_rows`,
which the ranks wrap to record the rows sent to each peer; the EP dispatch must send exactly the
kept assignments (those on other ranks cross the wire, those on this rank stay local), and
without ETP no all-gather may run at all.

The other exchanges (where every rank holds as many tokens, as the sync-free one requires):
the sync-free exchange (`SyncFreeAllToAllExchange`, static slots of a budget), the overlapped
one (two asynchronous pieces, the shared experts in between) and both together must give the
exact-size exchange's outputs and gradients bit for bit, reading nothing on the host in the
sync-free case; a budget too small must be reported as an overflow by the counters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import RoutingConfig
from torch.distributed.tensor import DTensor

from moetrain.model import Transformer
from moetrain.model.moe import MoELayer, moe_layers
from moetrain.model.moe.capacity import capacity_keep_mask, expert_capacity
from moetrain.parallel import expert_parallel
from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.expert_parallel import (
    AllToAllExchange, SyncFreeAllToAllExchange, apply_expert_parallel,
)
from moetrain.parallel.mesh import build_meshes
from tests.harness import ranks_fixture, run_distributed
from tests.test_host_syncs import count_reads
from tests.model.tiny import layer_stats, make_cfg, step_rows

E, K, D, F = 8, 2, 32, 16
DEAD = (2, 3)  # experts no token picks in the "empty" scenario
# fp32: elementwise rtol, plus an atol relative to the tensor's largest entry (sums of many
# large terms that cancel, e.g. router gradients, lose absolute, not relative-to-scale, digits).
RTOL = 1e-5


def assert_close(got, want, where):
    atol = RTOL * max(want.abs().max().item(), 1.0) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{where}: {m}")


@dataclass(frozen=True)
class Scenario:
    name: str
    sizes: tuple[int, ...]  # tokens per global rank
    moe: dict = field(default_factory=dict)
    lbl_coeff: float = 0.0
    dead_experts: bool = False


def scenarios(world: int) -> list[Scenario]:
    even = (24 // world,) * world
    uneven = (0, 13) if world == 2 else (0, 9, 5, 10)  # rank 0 holds no tokens
    return [
        Scenario("dropless", even),
        Scenario("empty", uneven, dead_experts=True),
        Scenario("capacity", tuple(s + 2 for s in even),
                 dict(capacity_factor=1.0, z_loss_coeff=1e-3), lbl_coeff=0.01),
        Scenario("capacity_padded", tuple(s + 2 for s in even),
                 dict(capacity_factor=1.0, pad_to_capacity=True)),
        # null experts and top-p: inactive assignments are neither computed nor sent
        Scenario("null_top_p", even,
                 dict(routing=RoutingConfig(num_null_experts=2, top_p=0.6), capacity_factor=0.7)),
    ]


def make_layer(sc: Scenario, **moe) -> MoELayer:
    cfg = make_cfg(moe=dict(num_experts=E, top_k=K, expert_hidden=F, **sc.moe, **moe),
                   lbl=dict(coeff=sc.lbl_coeff), d_model=D)
    torch.manual_seed(1234)
    layer = MoELayer(D, cfg.moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if sc.dead_experts:
        with torch.no_grad():  # feature 0 of every token is a large constant (see make_batch)
            layer.router.weight[list(DEAD), 0] = -5.0
    return layer


def make_batch(sc: Scenario):
    gen = torch.Generator().manual_seed(99)
    T = sum(sc.sizes)
    x = torch.randn(1, T, D, generator=gen)
    if sc.dead_experts:
        x[..., 0] = 4.0
    grad_y = torch.randn(1, T, D, generator=gen)
    return x, grad_y


def rank_slice(sc: Scenario, rank: int) -> slice:
    start = sum(sc.sizes[:rank])
    return slice(start, start + sc.sizes[rank])


def forward_backward(layer: MoELayer, x, grad_y):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad_y)
    return y.detach(), x.grad


def reference(layer: MoELayer, sc: Scenario, x_full, g_full):
    """(y, x grad, parameter grads, dropped per rank, kept assignments per rank and expert)."""
    layer.zero_grad()
    slices = [rank_slice(sc, r) for r in range(len(sc.sizes))]
    if layer.capacity_factor is not None:  # each rank's tokens alone; parameter grads summed
        parts = [forward_backward(layer, x_full[:, s], g_full[:, s]) for s in slices]
        y, gx = (torch.cat(p, 1) for p in zip(*parts))
    else:
        y, gx = forward_backward(layer, x_full, g_full)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    dropped, kept_RE = [], []
    with torch.no_grad():
        for s in slices:
            keep_TK, idx_TK, active_TK = routing_of(layer, x_full[0, s])
            dropped.append(int(active_TK.sum() - keep_TK.sum()))  # by capacity
            kept_RE.append(torch.bincount(idx_TK[keep_TK], minlength=E))
    return y, gx, grads, dropped, kept_RE


def routing_of(layer: MoELayer, x_TD):
    """(kept, expert ids, active) [T, k] of a single-process layer on these tokens alone."""
    routing = layer.router(x_TD)
    idx_TK = routing.topk_idx_TK
    active_TK = routing.active_TK  # None, or False for null experts / beyond top-p
    if active_TK is None:
        active_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    if layer.capacity_factor is None:
        return active_TK, idx_TK, active_TK
    C = expert_capacity(x_TD.shape[0], K, E, layer.capacity_factor)
    bucketed_TK = idx_TK.masked_fill(~active_TK, E)  # inactive ones compete for no expert
    fits_TK = capacity_keep_mask(bucketed_TK, routing.scores_TE.gather(1, idx_TK), E + 1, C)
    return fits_TK & active_TK, idx_TK, active_TK


class Recorder:
    """Wraps the row exchange and the all-gathers of this (forked) rank to record what runs."""

    def __init__(self):
        # (group, rows sent to each group rank, rows received from each)
        self.exchanges: list[tuple[dist.ProcessGroup, list[int], list[int]]] = []
        self.gathers: list[dist.ProcessGroup] = []
        exchange, gather = expert_parallel.all_to_all_rows, dist.all_gather_into_tensor

        def recording_exchange(x, output_splits, input_splits, group):
            self.exchanges.append((group, list(input_splits), list(output_splits)))
            return exchange(x, output_splits, input_splits, group)

        def recording_gather(out, inp, group=None, **kw):
            self.gathers.append(group)
            return gather(out, inp, group=group, **kw)

        def forbidden(*args, **kwargs):
            raise AssertionError("list-form / uneven all_gather must not be used on the EP path")

        expert_parallel.all_to_all_rows = recording_exchange
        dist.all_gather_into_tensor = recording_gather
        dist.all_gather = forbidden

    def clear(self):
        self.exchanges.clear()
        self.gathers.clear()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def errors(got, want) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference value)."""
    if want.numel() == 0:
        return 0.0, 0.0
    err = (got - want).abs().max().item()
    return err, err / max(want.abs().max().item(), 1e-30)


def check_layout(rank: int, world: int, layouts: list[tuple[int, int]]):
    recorder = Recorder()
    report = {}
    for ep, etp in layouts:
        dims = ParallelDims(world, ep=ep, etp=etp)
        meshes = build_meshes(dims, "cpu")
        groups = {kind: meshes.group(kind) for kind in ("ep", "etp", "edp")}
        ep_rank, etp_rank = dist.get_rank(groups["ep"]), dist.get_rank(groups["etp"])
        L, F_local = E // ep, F // etp
        e_sl = slice(ep_rank * L, (ep_rank + 1) * L)
        f_sl = slice(etp_rank * F_local, (etp_rank + 1) * F_local)
        for sc in scenarios(world):
            where = f"ep={ep} etp={etp} {sc.name} rank {rank}"
            ref_layer = make_layer(sc)
            layer = apply_expert_parallel(copy.deepcopy(ref_layer), meshes.experts)
            assert isinstance(layer.dispatcher.exchange, AllToAllExchange), where
            assert layer.experts.w1.shape == (E, D, F), where  # DTensors: the global shape
            assert _local(layer.experts.w1).shape == (L, D, F_local), where
            assert _local(layer.experts.w2).shape == (L, F_local, D), where
            assert torch.equal(_local(layer.experts.w2), ref_layer.experts.w2[e_sl, f_sl]), where
            x_full, g_full = make_batch(sc)
            y_ref, gx_ref, grads_ref, dropped_ref, kept_RE = reference(ref_layer, sc, x_full,
                                                                       g_full)
            if sc.dead_experts:
                assert sum(kept_RE)[list(DEAD)].sum() == 0, "the dead experts were picked"

            mine = rank_slice(sc, rank)
            recorder.clear()
            before = step_rows(layer).rows_LC  # the copy holds the reference's forwards
            y, gx = forward_backward(layer, x_full[:, mine], g_full[:, mine])
            assert_close(y, y_ref[:, mine], f"{where} output")
            assert_close(gx, gx_ref[:, mine], f"{where} input grad")
            assert int(layer_stats(layer, since=before).dropped) == dropped_ref[rank], where
            if sc.moe.get("capacity_factor") is not None:
                assert sum(dropped_ref) > 0, "the capacity scenario drops nothing"

            router_grad = layer.router.weight.grad.clone()
            dist.all_reduce(router_grad)  # every rank holds other tokens
            assert_close(router_grad, grads_ref["router.weight"], f"{where} router grad")
            errs = [errors(y, y_ref[:, mine]), errors(gx, gx_ref[:, mine]),
                    errors(router_grad, grads_ref["router.weight"])]
            for name, index in (("w1", (e_sl, slice(None), f_sl)),
                                ("w3", (e_sl, slice(None), f_sl)),
                                ("w2", (e_sl, f_sl, slice(None)))):
                grad = _local(getattr(layer.experts, name).grad).clone()
                dist.all_reduce(grad, group=groups["edp"])  # same shard, other tokens
                want = grads_ref[f"experts.{name}"][index]
                assert_close(grad, want, f"{where} {name} grad")
                errs.append(errors(grad, want))

            # Bytes: the forward's EP dispatch is the first exchange on the EP group.
            ep_sends = [(out, back) for g, out, back in recorder.exchanges if g is groups["ep"]]
            sent, received = ep_sends[0]
            peers = dist.get_process_group_ranks(groups["ep"])
            if sc.moe.get("pad_to_capacity"):  # static shapes: capacity rows per expert
                C = expert_capacity(sc.sizes[rank], K, E, sc.moe["capacity_factor"])
                assert sent == [C * L] * ep, where
            else:  # exactly the kept assignments, each to its expert's rank; none dropped sent
                kept_by_dest = kept_RE[rank].view(ep, L).sum(1).tolist()
                assert sent == kept_by_dest, where
                assert sum(sent) == kept_RE[rank].sum(), where
                off_rank = sum(kept_by_dest) - kept_by_dest[ep_rank]  # cross the wire
                assert sum(sent) - sent[ep_rank] == off_rank, where
                assert received == [int(kept_RE[p][e_sl].sum()) for p in peers], where
            if etp == 1:
                assert not recorder.gathers, f"{where}: an all-gather ran on the EP path"
                # dispatch and combine (the backward exchanges run inside autograd)
                assert len(recorder.exchanges) == 2, where
            else:
                assert all(g is groups["etp"] for g in recorder.gathers), where
                etp_sends = [s for g, s, _ in recorder.exchanges if g is groups["etp"]]
                assert etp_sends[0] == [sum(received)] * etp, where
            report[(ep, etp, sc.name)] = (
                max(e[0] for e in errs), max(e[1] for e in errs), received)
            if len(set(sc.sizes)) == 1:
                check_variants(sc, meshes, x_full[:, mine], g_full[:, mine], where)
        report[(ep, etp, "transformer")] = check_transformer(rank, world, meshes, etp)
    return report


# (sync-free budget or None, overlap): budget 4 fits every slot of these scenarios.
VARIANTS = {"sync-free": (4.0, False), "overlap": (None, True), "sync-free overlap": (4.0, True)}


def run_variant(sc: Scenario, meshes, x, g, budget, overlap, shared=0):
    """A fresh EP layer (exact-size exchange unless `budget`) and its forward + backward:
    (output, input grad, local parameter grads by name, exchange counters, host-read events)."""
    layer = apply_expert_parallel(make_layer(sc, ep_overlap=overlap, num_shared_experts=shared),
                                  meshes.experts, sync_free=budget is not None)
    layer.start_step(top_k=K, capacity_factor=layer.capacity_factor, aux_loss_scale=1.0,
                     ep_budget=budget)
    with count_reads() as (events, _):
        y, gx = forward_backward(layer, x, g)
    grads = {n: _local(p.grad).clone() for n, p in layer.named_parameters()}
    return y, gx, grads, layer.exchange_stats.clone(), list(events), layer


def check_variants(sc: Scenario, meshes, x, g, where):
    """The sync-free, overlapped and both exchanges equal the exact one bit for bit (with and
    without shared experts, which overlap the exchange); the sync-free ones read nothing."""
    for shared in (0, 1):
        y0, gx0, grads0, stats0, events0, _ = run_variant(sc, meshes, x, g, None, False, shared)
        assert stats0.tolist() == [0, 0, 0, 0], where  # the exact exchange counts nothing
        assert any("Tensor.tolist (parallel/expert_parallel.py" in e for e in events0), where
        for name, (budget, overlap) in VARIANTS.items():
            at = f"{where} {name} shared={shared}"
            y, gx, grads, stats, events, layer = run_variant(sc, meshes, x, g, budget, overlap,
                                                             shared)
            assert isinstance(layer.dispatcher.exchange,
                              SyncFreeAllToAllExchange if budget else AllToAllExchange), at
            assert torch.equal(y, y0) and torch.equal(gx, gx0), at
            assert all(torch.equal(grads[n], grads0[n]) for n in grads0), at
            if budget is not None:
                assert events == [], f"{at}: host reads {events}"
                overflowed, need, rows, slots = stats.tolist()
                assert overflowed == 0 and 0 < need <= budget and rows <= slots, (at, stats)
    # A budget far too small: rows do not fit, the counters say so on some rank.
    *_, stats, _, _ = run_variant(sc, meshes, x, g, 0.25, False)
    flags = torch.tensor([float(stats[0])])
    dist.all_reduce(flags)
    assert flags.item() > 0 and stats[2] <= stats[3], f"{where}: no overflow reported {stats}"


def check_transformer(rank, world, meshes, etp):
    """Two MoE blocks (one activation-checkpointed) under EP: every collective of the forward,
    the backward and the recompute must line up across ranks; logits and all grads exact. The
    overlapped and the sync-free exchanges give the exact exchange's logits and grads bitwise
    (the asynchronous pieces also in the recompute)."""
    cfg = make_cfg(moe=dict(num_experts=E, top_k=K, expert_hidden=F), lbl=dict(coeff=0.0),
                   d_model=D, n_layers=3)
    cfg.moe.first_dense_layers = 1
    torch.manual_seed(7)
    ref = Transformer(cfg)
    base = copy.deepcopy(ref)  # unwrapped, without gradients: what every EP model starts from
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (world, 6), generator=gen)

    def checkpointed(m):
        block = m.layers["2"]
        block.forward = (lambda f: lambda h, pos, doc_pos: checkpoint(f, h, pos, doc_pos,
                                                                      use_reentrant=False))(
            block.forward)
        return m

    def ep_model(budget=None, overlap=False):
        source = copy.deepcopy(base)
        if overlap:  # the config fixes it at construction: rebuild the layers' dispatchers
            for layer in moe_layers(source):
                layer.dispatcher.overlap = True
        model = checkpointed(apply_expert_parallel(source, meshes.experts,
                                                   sync_free=budget is not None))
        for layer in moe_layers(model):
            layer.start_step(top_k=K, capacity_factor=None, aux_loss_scale=1.0, ep_budget=budget)
        logits = model(tokens[rank:rank + 1])
        logits.square().sum().backward()
        return model, logits

    checkpointed(ref)(tokens).square().sum().backward()
    model, logits = ep_model()
    where = f"transformer ep={meshes.dims.ep} etp={etp} rank {rank}"
    with torch.no_grad():
        assert_close(logits, ref(tokens)[rank:rank + 1], f"{where} logits")
        assert_close(model(tokens[rank:rank + 1]), logits.detach(), f"{where} no-grad logits")
    with pytest.raises(RuntimeError, match="already sharded"):
        apply_expert_parallel(model, meshes.experts)
    errs = []
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad, want = _local(p.grad).clone(), ref_params[name].grad
        if ".experts." in name:
            dist.all_reduce(grad, group=meshes.group("edp"))
            # this rank's block: experts by EP rank, hidden columns by ETP rank
            L, F_local = E // meshes.dims.ep, F // etp
            e0, f0 = meshes.local_rank("ep") * L, meshes.local_rank("etp") * F_local
            e_sl, f_sl = slice(e0, e0 + L), slice(f0, f0 + F_local)
            want = want[e_sl, :, f_sl] if name.endswith(("w1", "w3")) else want[e_sl, f_sl, :]
        else:
            dist.all_reduce(grad)  # dense and router params: every rank holds other tokens
        assert_close(grad, want, f"{where} {name} grad")
        errs.append(errors(grad, want))
    for variant, (budget, overlap) in VARIANTS.items():
        other, other_logits = ep_model(budget, overlap)
        assert torch.equal(other_logits, logits), f"{where} {variant} logits"
        for (name, p), q in zip(model.named_parameters(), other.parameters()):
            assert torch.equal(_local(p.grad), _local(q.grad)), f"{where} {variant} {name} grad"
    return max(e[0] for e in errs), max(e[1] for e in errs), None


def _print_errors(results):
    world = len(results)
    worst = {}
    for per_rank in results:
        for key, (abs_err, rel_err, _) in per_rank.items():
            a, r = worst.get(key, (0.0, 0.0))
            worst[key] = (max(a, abs_err), max(r, rel_err))
    for key, (a, r) in sorted(worst.items()):
        edp = world // (key[0] * key[1])
        print(f"W={world} ep={key[0]} etp={key[1]} edp={edp} {key[2]:16s} "
              f"max abs err {a:.2e}  max rel err {r:.2e}")


def test_expert_major_order():
    counts_SL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rows: s0e0 s0e0 s0e2 s1e0 s1e1 s1e1 s1e1
    order = expert_parallel._expert_major_order(counts_SL, 7)
    assert order.tolist() == [0, 1, 3, 4, 5, 6, 2]  # e0: s0, s0, s1; e1: s1 x3; e2: s0
    assert expert_parallel._expert_major_order(counts_SL[:1], 3) is None  # one source
    assert expert_parallel._expert_major_order(counts_SL[:, :1], 3) is None  # one expert


def test_ep2():
    results = run_distributed(check_layout, 2, [(2, 1)], timeout=60)
    _print_errors(results)


# One 4-rank launch for ep4 and for ep2 x etp2, ep2 x edp2.
four_ranks = ranks_fixture(check_layout, 4, [(4, 1), (2, 2), (2, 1)], timeout=150)


def _layouts(results, *layouts):
    """Each rank's report of these (ep, etp) layouts only."""
    return [{k: v for k, v in per_rank.items() if k[:2] in layouts} for per_rank in results]


def test_ep4_with_a_rank_whose_experts_get_no_tokens(four_ranks):
    results = _layouts(four_ranks, (4, 1))
    _print_errors(results)
    # experts 2 and 3 live on EP rank 1, which receives no rows in the "empty" scenario
    assert results[1][(4, 1, "empty")][2] == [0, 0, 0, 0]


def test_ep2_etp2_and_ep2_edp2(four_ranks):
    _print_errors(_layouts(four_ranks, (2, 2), (2, 1)))
