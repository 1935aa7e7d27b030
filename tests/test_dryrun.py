"""The dry run: the real shapes built under a fake process group at small world sizes equal the
planner tensor by tensor, and a planner that is wrong is caught. The frontier shapes keep their
widths with 8 layers here (the build's time is per layer); scripts/bench_plan.py dry-runs them
whole at 256 to 2,048 ranks (docs/planning.md)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from moetrain import plan_shards
from moetrain.config import compose, to_object
from moetrain.dryrun import dry_run, format_dry_run, role_ranks
from moetrain.parallel import check_layout


def config(name, *overrides):
    return to_object(compose([f"+experiment={name}", *overrides]))


CASES = [
    # DeepSeek-V3: MLA, a shared expert, 3 dense layers, an uneven pipeline split
    ("deepseek_v3", 16, ["model.n_layers=7", "parallel.pp=2", "parallel.ep=8",
                         "parallel.pp_layers=[3,4]"]),
    # Kimi K2: MLA under TP (replicated latent path), 384 experts over EP
    ("kimi_k2", 8, ["model.n_layers=4", "parallel.tp=2", "parallel.ep=4"]),
    # Qwen3-235B: interleaved virtual stages, TP with per-head q/k norms, experts folded over TP
    # (16 micro-batches: torch computes an interleaved order per micro-batch)
    ("qwen3_235b_a22b", 16, ["model.n_layers=8", "train.global_batch_size=64", "parallel.tp=2",
                             "parallel.pp=2", "parallel.vpp=2",
                             "parallel.pp_schedule=interleaved", "parallel.ep=4"]),
    # a vocabulary TP cannot split evenly and FSDP over 3: each TP coordinate x first / last
    # shard position holds its own shard sizes (roles 0, 1, 4, 5)
    ("tiny", 6, ["model.vocab_size=8191", "parallel.tp=2", "train.global_batch_size=6"]),
    # uneven vocabulary shards (FSDP2 padding), ETP and CP, replicated data parallelism
    ("tiny", 8, ["model.vocab_size=8190", "parallel.tp=2", "parallel.etp=2", "parallel.cp=2"]),
    ("tiny", 8, ["parallel.fsdp.enabled=false", "parallel.ep=4", "model.moe.num_shared_experts=1"]),
    # (DeepSeek-V3 and Kimi K2 above train one MoE MTP module.) Two dense MTP modules with a
    # tied head under PP and TP: the last stage's copy of the embedding, colwise projections
    ("tiny", 4, ["model.mtp.depth=2", "model.mtp.block=dense", "model.tie_embeddings=true",
                 "parallel.pp=2", "parallel.tp=2"]),
]


@pytest.mark.parametrize("name, world, overrides", CASES,
                         ids=[f"{c[0]}-w{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_every_role_equals_the_planner(name, world, overrides):
    cfg = config(name, *overrides)
    dims = check_layout(cfg, world)
    run = dry_run(cfg, dims)
    assert not dist.is_initialized()  # the fake group is gone
    assert [r.rank for r in run.roles] == role_ranks(cfg, dims)
    assert run.ok, format_dry_run(run)
    for role in run.roles:
        assert role.built and set(role.built) == set(role.planned)
        assert role.comm_built == role.comm_planned
        assert role.memory["parameters"][0] > 0
    # the roles together hold the first and the last layer
    held = {n for r in run.roles for n in r.built}
    assert any(n.startswith("layers.0.") for n in held)
    assert any(n.startswith(f"layers.{cfg.model.n_layers - 1}.") for n in held)


def test_a_wrong_planner_is_an_error(monkeypatch, capsys):
    """The planner used to split MLA's latent projections over TP; the code replicates them.
    Put that back: the dry run names the tensor and the command exits 1."""
    original = plan_shards._specs_attention

    def split_latent(model, prefix):
        return [s if not s.name.endswith("wkv_a.weight") else
                plan_shards.ParamSpec(s.name, s.shape, s.component, s.kind, 0)
                for s in original(model, prefix)]

    monkeypatch.setattr(plan_shards, "_specs_attention", split_latent)
    plan_shards._block_template.cache_clear()
    try:
        cfg = config("tiny", "model.attention=mla", "model.n_kv_heads=8", "parallel.tp=2")
        run = dry_run(cfg, check_layout(cfg, 2))
        assert not run.ok
        errors = [e for r in run.roles for e in r.param_errors]
        assert any(e.startswith("layers.0.attention.wkv_a.weight: built") for e in errors)
        from moetrain.plan import main

        assert main(["+experiment=tiny", "model.attention=mla", "model.n_kv_heads=8",
                     "parallel.tp=2", "--world-size", "2", "--dry-run"]) == 1
        assert "dry run: FAILED" in capsys.readouterr().out
    finally:
        plan_shards._block_template.cache_clear()


def test_the_roles_are_every_distinct_holding_of_each_stage():
    """tp2 x dp3 with 8,191 vocabulary rows: the TP halves are 4,096 and 4,095 rows, each split
    over three FSDP ranks into 1,366 + 1,366 + 1,364 or 1,365 + 1,365 + 1,365 (padded to 1,365):
    rank 4 (TP 0, last shard) differs from ranks 0 and 2, rank 5 (TP 1, last) only by
    padding - counted here by hand, not with the planner's chunking."""
    cfg = config("tiny", "model.vocab_size=8191", "parallel.tp=2", "train.global_batch_size=6")
    dims = check_layout(cfg, 6)
    assert role_ranks(cfg, dims) == [0, 1, 4, 5]
    emb = {r.rank: r.built["tok_embeddings.weight"] for r in dry_run(cfg, dims).roles}
    d = cfg.model.d_model
    assert {r: (b.held, b.allocated) for r, b in emb.items()} == {
        0: (1366 * d, 1366 * d), 1: (1365 * d, 1365 * d), 4: (1364 * d, 1366 * d),
        5: (1365 * d, 1365 * d)}
    # pipeline stages keep their own roles: the last rank of each stage at least
    pp = config("tiny", "parallel.pp=2")
    assert role_ranks(pp, check_layout(pp, 4)) == [0, 1, 2, 3]
