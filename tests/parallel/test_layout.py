"""The five-dimensional layout: degrees, validation, rank groups, the layout tool and meshes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.distributed as dist

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.parallel.checks import check_layout, check_model_fit
from moetrain.parallel.dims import GROUP_KINDS, LayoutError, ParallelDims
from moetrain.parallel.mesh import build_meshes
from tests.harness import ranks_fixture, run_python


# -- hand-checked cases --------------------------------------------------------------------------


def test_w8_tp2_cp2_groups_by_hand():
    dims = ParallelDims(8, tp=2, cp=2)
    assert (dims.dp, dims.edp) == (2, 8)
    g = dims.groups()
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["pp"] == [[r] for r in range(8)]
    assert g["ep"] == [[r] for r in range(8)]
    assert g["edp"] == [list(range(8))]


def test_folded_ep_over_cp_and_dp_by_hand():
    # W=8 tp=2 cp=2 ep=4, etp=1: EP is the fastest-varying MoE dim, so one EP group holds the
    # TP and CP ranks of one DP replica; EDP then pairs the replicas, like DP.
    dims = ParallelDims(8, tp=2, cp=2, ep=4)
    g = dims.groups()
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["etp"] == [[r] for r in range(8)]


def test_w32_five_dims_by_hand():
    dims = ParallelDims(32, tp=2, cp=2, pp=2, ep=4, etp=2)
    assert dims.dense_shape == (2, 4, 2, 2) and dims.moe_shape == (2, 2, 4, 2)
    g = dims.groups()
    assert g["pp"][0] == [0, 16]
    assert g["dp"][0] == [0, 4, 8, 12]
    assert g["ep"][0] == [0, 2, 4, 6]
    assert g["edp"][0] == [0, 8]
    assert dims.dense_coord(13) == (0, 3, 0, 1)  # (pp, dp, cp, tp)
    assert dims.moe_coord(13) == (0, 1, 2, 1)  # (pp, edp, ep, etp)
    assert dims.group_of("dp_cp", 13) == [1, 3, 5, 7, 9, 11, 13, 15]


def _all_layouts(world_size):
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    for tp, cp, pp, ep, etp in itertools.product(divisors, repeat=5):
        if world_size % (tp * cp * pp) == 0 and world_size % (etp * ep * pp) == 0:
            yield ParallelDims(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)


@pytest.mark.parametrize("world_size", [1, 6, 8, 12, 16])
def test_groups_partition_the_world_and_match_coordinates(world_size):
    for dims in _all_layouts(world_size):
        groups = dims.groups()
        assert set(groups) == set(GROUP_KINDS)
        for kind, kind_groups in groups.items():
            assert sorted(r for g in kind_groups for r in g) == list(range(world_size)), kind
            assert all(len(g) == dims.size(kind) for g in kind_groups), kind
        assert groups["pp"] == dims.groups_of("pp")  # both views share the pipeline groups
        for rank in range(world_size):
            d, m = dims.dense_coord(rank), dims.moe_coord(rank)
            assert d.pp == m.pp
            assert dims.group_of("tp", rank).index(rank) == d.tp
            assert dims.group_of("cp", rank).index(rank) == d.cp
            assert dims.group_of("dp", rank).index(rank) == d.dp
            assert dims.group_of("pp", rank).index(rank) == d.pp
            assert dims.group_of("dp_cp", rank).index(rank) == d.dp * dims.cp + d.cp
            assert dims.group_of("dp_cp_tp", rank).index(rank) == (
                (d.dp * dims.cp + d.cp) * dims.tp + d.tp)
            assert dims.group_of("etp", rank).index(rank) == m.etp
            assert dims.group_of("ep", rank).index(rank) == m.ep
            assert dims.group_of("edp", rank).index(rank) == m.edp


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world_size, degrees, keys, text",
    [
        (4, dict(tp=2, cp=2, pp=2), ("parallel.tp", "parallel.cp", "parallel.pp"),
         "parallel.tp*parallel.cp*parallel.pp = 2*2*2 = 8 does not divide the world size 4"),
        (12, dict(tp=8), ("parallel.tp",), "does not divide the world size 12"),
        (8, dict(ep=16), ("parallel.etp", "parallel.ep", "parallel.pp"),
         "parallel.etp*parallel.ep*parallel.pp = 1*16*1 = 16 does not divide the world size 8"),
        (8, dict(pp=2, ep=4, etp=2), ("parallel.etp", "parallel.ep", "parallel.pp"), "= 16"),
        (8, dict(vpp=2), ("parallel.vpp", "parallel.pp"), "parallel.vpp = 2"),
        (8, dict(tp=0), ("parallel.tp",), "parallel.tp must be a positive integer, got 0"),
        (0, dict(), ("world_size",), "world size must be a positive integer"),
    ],
)
def test_validate_names_keys(world_size, degrees, keys, text):
    with pytest.raises(LayoutError) as info:
        ParallelDims(world_size, **degrees)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and text in message
    assert set(keys) <= set(info.value.keys)
    assert all(key in message for key in keys if key != "world_size")


def _model(**kw):
    moe = {k[4:]: kw.pop(k) for k in list(kw) if k.startswith("moe_")}
    mtp = {k[4:]: kw.pop(k) for k in list(kw) if k.startswith("mtp_")}
    model = ModelConfig(**kw)
    for k, v in moe.items():
        setattr(model.moe, k, v)
    for k, v in mtp.items():
        setattr(model.mtp, k, v)
    return model


@pytest.mark.parametrize(
    "degrees, model, train, seq_len, key, text",
    [
        (dict(ep=8), dict(moe_num_experts=12), {}, 128, "model.moe.num_experts",
         "model.moe.num_experts = 12 is not divisible by parallel.ep = 8"),
        (dict(ep=2, etp=2), dict(moe_expert_hidden=255), {}, 128, "model.moe.expert_hidden",
         "parallel.etp = 2"),
        (dict(tp=8), dict(n_heads=12, n_kv_heads=8), {}, 128, "model.n_heads",
         "model.n_heads = 12 is not divisible by parallel.tp = 8"),
        (dict(tp=4), dict(n_heads=8, n_kv_heads=2), {}, 128, "model.n_kv_heads",
         "model.n_kv_heads = 2 is not divisible by parallel.tp = 4"),
        (dict(tp=2), dict(moe_first_dense_layers=1, ffn_hidden=511), {}, 128, "model.ffn_hidden",
         "model.ffn_hidden = 511"),
        # a dense MTP block is a dense MLP too
        (dict(tp=2), dict(moe_first_dense_layers=0, ffn_hidden=511, mtp_depth=1,
                          mtp_block="dense"), {}, 128, "model.ffn_hidden", "model.ffn_hidden = 511"),
        (dict(cp=2), {}, {}, 130, "data.seq_len",
         "data.seq_len = 130 is not divisible by 2*parallel.cp = 4"),
        (dict(tp=2), {}, {}, 127, "data.seq_len",
         "data.seq_len = 127 is not divisible by parallel.cp*parallel.tp = 1*2"),
        (dict(pp=2, vpp=3), dict(n_layers=4), {}, 128, "model.n_layers",
         "model.n_layers = 4 is not divisible by parallel.pp*parallel.vpp = 2*3 = 6"),
        (dict(tp=2), {}, dict(global_batch_size=16, micro_batch_size=8), 128,
         "train.global_batch_size", "train.micro_batch_size*dp = 8*4 = 32"),
    ],
)
def test_model_fit_names_keys(degrees, model, train, seq_len, key, text):
    dims = ParallelDims(8, **degrees)
    with pytest.raises(LayoutError) as info:
        check_model_fit(dims, _model(**model), TrainConfig(**train), seq_len)
    message = str(info.value)
    assert "\n" not in message and text in message and key in message
    assert key in info.value.keys


def test_model_fit_accepts_good_and_refuses_too_few_kv_heads():
    dims = ParallelDims(8, tp=2, cp=2, ep=4)
    check_model_fit(dims, ModelConfig(), TrainConfig(global_batch_size=16, micro_batch_size=4),
                       128)
    dims = ParallelDims(4, tp=4)
    model = _model(n_heads=8, n_kv_heads=2)
    with pytest.raises(LayoutError):
        check_model_fit(dims, model, TrainConfig(global_batch_size=8), 128)


@pytest.mark.parametrize(
    "degrees, schedule, model, train, keys, text",
    [
        (dict(pp=2, vpp=2), "1f1b", {}, {}, ("parallel.pp_schedule", "parallel.vpp"),
         "parallel.pp_schedule = 1f1b runs one stage per rank, but parallel.vpp = 2"),
        (dict(pp=2, vpp=2), "gpipe", {}, {}, ("parallel.pp_schedule", "parallel.vpp"),
         "use interleaved or zero_bubble"),
        # dp = 2: 16 / (4 * 2) = 2 micro-batches per DP rank, 1f1b over 4 stages needs 4
        (dict(pp=4), "1f1b", dict(n_layers=8), dict(global_batch_size=16, micro_batch_size=4),
         ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"),
         "needs at least parallel.pp = 4 micro-batches per data-parallel rank, got 2"),
        # dp = 4: 40 / (2 * 4) = 5 micro-batches per DP rank, in max(1, 5 // 2) = 2 rounds
        (dict(pp=2, vpp=2), "interleaved", {}, dict(global_batch_size=40, micro_batch_size=2),
         ("parallel.pp_schedule", "train.global_batch_size", "train.micro_batch_size"),
         "(5) to be a multiple of max(1, micro-batches // parallel.pp) = 2"),
    ],
)
def test_pipeline_schedule_is_checked_before_any_process_group(degrees, schedule, model, train,
                                                                keys, text):
    dims = ParallelDims(8, **degrees)
    train = TrainConfig(**{"global_batch_size": 32, "micro_batch_size": 2, **train})
    with pytest.raises(LayoutError) as info:
        check_model_fit(dims, _model(**model), train, 128, pp_schedule=schedule)
    assert text in str(info.value) and set(keys) <= set(info.value.keys)


def test_pipeline_schedules_that_fit():
    train = TrainConfig(global_batch_size=16, micro_batch_size=2)  # 8 micro-batches at dp1
    for schedule in ("gpipe", "1f1b", "interleaved", "zero_bubble"):
        check_model_fit(ParallelDims(4, pp=4), ModelConfig(), train, 128, pp_schedule=schedule)
    for schedule in ("interleaved", "zero_bubble"):
        check_model_fit(ParallelDims(2, pp=2, vpp=2), ModelConfig(), train, 128,
                           pp_schedule=schedule)
    # tied embeddings fit any layout (the last stage's copy: docs/pipeline_parallel.md)
    check_model_fit(ParallelDims(2), _model(tie_embeddings=True), train, 128, pp_schedule="1f1b")
    check_model_fit(ParallelDims(4, pp=2), _model(tie_embeddings=True), train, 128,
                    pp_schedule="1f1b")


# -- the layout tool -----------------------------------------------------------------------------


def _layout_cli(*args):
    return run_python("-m", "moetrain.layout", *args, timeout=60)


def test_cli_json_matches_groups():
    out = _layout_cli("--world-size", "16", "parallel.tp=2", "parallel.ep=8", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ParallelDims(16, tp=2, ep=8).groups()


def test_cli_table_lists_groups_and_ranks():
    out = _layout_cli("--world-size", "8", "parallel.tp=2", "parallel.cp=2", "parallel.ep=4")
    assert out.returncode == 0, out.stderr
    assert "[0,1] [2,3] [4,5] [6,7]" in out.stdout  # tp groups
    table = " ".join(out.stdout.split())  # column widths follow the longest group name
    assert "dp_cp 4 x 2: [0,2,4,6] [1,3,5,7]" in table
    assert "dp_cp_tp 8 x 1: [0,1,2,3,4,5,6,7]" in table
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("7 ")]
    assert rows == [["7", "|", "0", "1", "1", "1", "|", "0", "1", "3", "0", "|", "0"]]
    assert "nodes: 1 of 8 GPUs" in out.stdout


@pytest.mark.parametrize(
    "args, key",
    [
        (["--world-size", "4", "parallel.tp=2", "parallel.cp=2", "parallel.pp=2"], "parallel.tp"),
        (["--world-size", "8", "parallel.ep=8", "model.moe.num_experts=12"],
         "model.moe.num_experts"),
        (["--world-size", "8", "parallel.tp=2", "model.n_kv_heads=1"], "model.n_kv_heads"),
        (["--world-size", "8", "parallel.tpp=2"], "parallel.tpp"),
        (["--world-size", "8", "parallel.tp=two"], "parallel.tp"),
    ],
)
def test_cli_invalid_layout_exits_2_naming_the_key(args, key):
    out = _layout_cli(*args)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]


def test_cli_unknown_key_lists_valid_keys():
    out = _layout_cli("--world-size", "8", "model.d_modle=64")
    assert out.returncode == 2
    assert "did you mean model.d_model?" in out.stderr and "n_kv_heads" in out.stderr


def test_cli_composes_the_trainer_config():
    """The defaults are the config tree's (configs/), not the bare schema's, and an experiment
    is accepted: the README's example (micro-batch 2 from configs/train) and a real shape."""
    out = _layout_cli("--world-size", "8", "parallel.tp=2", "parallel.ep=4", "model.moe.num_experts=8")
    assert out.returncode == 0, out.stderr
    out = _layout_cli("--world-size", "64", "+experiment=mixtral_8x7b", "parallel.tp=2", "parallel.ep=8",
                      "parallel.pp=4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ParallelDims(64, tp=2, ep=8, pp=4).groups()
    # Mixtral has 8 KV heads: tp=16 cannot split them, the tiny model's 2 could not either
    out = _layout_cli("--world-size", "16", "+experiment=mixtral_8x7b", "parallel.tp=16")
    assert out.returncode == 2 and "model.n_kv_heads = 8" in out.stderr


# -- Megatron-Core's RankGenerator ---------------------------------------------------------------

LAYOUTS = [  # (world_size, tp, cp, pp, ep, etp)
    (1, 1, 1, 1, 1, 1),
    (8, 2, 2, 1, 1, 1),
    (8, 2, 2, 1, 4, 1),  # EP folded over TP and CP ranks
    (16, 2, 1, 1, 8, 1),  # EP folded over TP and DP ranks
    (32, 2, 2, 2, 4, 2),  # all five dims
    (8, 8, 1, 1, 8, 1),  # EP on exactly the TP ranks
    (8, 2, 1, 2, 2, 2),
    (16, 1, 4, 1, 4, 1),  # EP on exactly the CP ranks
    (12, 2, 1, 3, 2, 1),  # pp of 3
    (24, 2, 3, 1, 6, 1),  # cp of 3, ep of 6 spanning TP, CP and DP
    (32, 2, 1, 4, 8, 1),  # edp of 1
    (32, 4, 2, 1, 2, 4),  # etp == tp
    (16, 1, 1, 1, 16, 1),  # EP over the whole world
    (32, 1, 1, 2, 4, 4),  # etp > tp
    (6, 3, 1, 1, 2, 1),
    (32, 2, 2, 2, 2, 1),
]


@pytest.fixture(scope="module")
def megatron_groups():
    pytest.importorskip("megatron.core")
    from megatron.core.parallel_state import RankGenerator

    def groups(dims):
        # As megatron.core.parallel_state.initialize_model_parallel builds its two generators.
        order = "tp-cp-ep-dp-pp"
        dense = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=dims.cp, order=order)
        expert = RankGenerator(tp=dims.etp, ep=dims.ep, dp=dims.edp, pp=dims.pp, cp=1, order=order)
        return {
            "tp": dense.get_ranks("tp"),
            "cp": dense.get_ranks("cp"),
            "dp": dense.get_ranks("dp"),
            "pp": dense.get_ranks("pp"),
            "dp_cp": dense.get_ranks("dp-cp"),
            "cp_tp": dense.get_ranks("tp-cp"),
            "dp_cp_tp": dense.get_ranks("tp-dp-cp"),
            "ep": expert.get_ranks("ep"),
            "etp": expert.get_ranks("tp"),
            "edp": expert.get_ranks("dp"),
            "expert_pp": expert.get_ranks("pp"),
        }

    return groups


def _as_sets(groups):
    return {tuple(sorted(g)) for g in groups}


def _layout_id(layout):
    return "W{}-tp{}-cp{}-pp{}-ep{}-etp{}".format(*layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_groups_equal_megatron_rank_generator(layout, megatron_groups):
    world_size, tp, cp, pp, ep, etp = layout
    dims = ParallelDims(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
    ours, ref = dims.groups(), megatron_groups(dims)
    for kind in GROUP_KINDS:
        assert _as_sets(ours[kind]) == _as_sets(ref[kind]), kind
        assert ours[kind] == ref[kind], kind  # same order of groups and of ranks, too
    assert _as_sets(ref["expert_pp"]) == _as_sets(ours["pp"])


@pytest.mark.parametrize("world_size", [8, 12, 16])
def test_every_layout_equals_megatron(world_size, megatron_groups):
    for dims in _all_layouts(world_size):
        ours, ref = dims.groups(), megatron_groups(dims)
        for kind in GROUP_KINDS:
            assert ours[kind] == ref[kind], (kind, dims)


# -- torch DeviceMesh views (4 forked gloo ranks) ------------------------------------------------


def _check_meshes(rank, world_size, degrees):
    dims = ParallelDims(world_size, **degrees)
    meshes = build_meshes(dims, "cpu")  # asserts against dims itself, too
    seen = {}
    for kind in GROUP_KINDS:
        want = dims.group_of(kind, rank)
        ranks = dist.get_process_group_ranks(meshes.group(kind))
        assert ranks == want and meshes.ranks(kind) == want, (kind, ranks, want)
        assert meshes.local_rank(kind) == want.index(rank)
        # The group really communicates among exactly those ranks.
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=meshes.group(kind))
        assert total.item() == sum(want), kind
        seen[kind] = ranks
    assert meshes.dense.mesh_dim_names == ("pp", "dp", "cp", "tp")
    assert meshes.moe.mesh_dim_names == ("pp", "edp", "ep", "etp")
    return seen


MESH_DEGREES = {"tp2-dp2-ep4": dict(tp=2, ep=4), "tp2-cp2-ep2-etp2": dict(tp=2, cp=2, ep=2, etp=2),
                "pp2-cp2-ep2": dict(pp=2, cp=2, ep=2)}
# One 4-rank launch builds the meshes of every layout.
four_ranks = ranks_fixture(
    lambda rank, world_size: {name: _check_meshes(rank, world_size, degrees)
                              for name, degrees in MESH_DEGREES.items()},
    4, timeout=90, pg_timeout=20)


@pytest.mark.parametrize("name", MESH_DEGREES)
def test_meshes_match_groups_on_4_ranks(name, four_ranks):
    seen = [per_rank[name] for per_rank in four_ranks]
    dims = ParallelDims(4, **MESH_DEGREES[name])
    for kind in GROUP_KINDS:
        assert _as_sets(s[kind] for s in seen) == _as_sets(dims.groups_of(kind))


def test_unknown_pipeline_schedule_is_refused_by_the_schema():
    from moetrain.config import ConfigError, compose

    with pytest.raises(ConfigError) as info:
        compose(["parallel.pp_schedule=pipedream"])
    text = str(info.value)
    assert "parallel.pp_schedule" in text and "pipedream" in text and "gpipe" in text


def test_check_layout_from_whole_config():
    from moetrain.config.schema import MoetrainConfig

    cfg = MoetrainConfig()
    cfg.parallel.tp, cfg.parallel.ep = 2, 4
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 16, 4
    dims = check_layout(cfg, 8)
    assert dims == ParallelDims(8, tp=2, ep=4) and (dims.dp, dims.edp) == (4, 2)
    cfg.data.seq_len, cfg.parallel.cp = 130, 2
    with pytest.raises(LayoutError, match="data.seq_len = 130"):
        check_layout(cfg, 8)
    with pytest.raises(Exception):  # frozen
        dims.tp = 4


@pytest.mark.parametrize("world_size", [8, 24, 64])
def test_group_of_is_the_group_holding_the_rank(world_size):
    """group_of computes a rank's group from its coordinates; it is the one groups_of lists."""
    import itertools

    for tp, cp, pp, ep, etp in itertools.product((1, 2, 4), (1, 2), (1, 2), (1, 2, 4), (1, 2)):
        try:
            dims = ParallelDims(world_size, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp)
        except LayoutError:
            continue
        for kind in GROUP_KINDS:
            for group in dims.groups_of(kind):
                for rank in group:
                    assert dims.group_of(kind, rank) == group


# -- torch's DTensor caches and a second rank in one process ------------------------------------


def mesh_coordinate_after_a_cached_op(rank: int, world_size: int) -> tuple[int, ...]:
    """The dp_cp_tp coordinate that `torch.empty_like` of a DTensor on this rank's meshes reports,
    built under a fake process group of `world_size` (no communication): torch takes the output's
    mesh from its sharding-propagation cache, keyed by mesh equality, which ignores the rank."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        meshes = build_meshes(ParallelDims(world_size, tp=world_size), "cpu")
        t = distribute_tensor(torch.zeros(8), meshes.dp_cp_tp, [Shard(0)], src_data_rank=None)
        return torch.empty_like(t).device_mesh.get_coordinate()
    finally:
        dist.destroy_process_group()


def test_a_second_rank_built_in_one_process_gets_its_own_coordinates():
    """The dry run builds its roles one after another in one process: rank 1's DTensors must not
    carry rank 0's mesh (build_meshes empties the caches; without it rank 1 reads (0,))."""
    assert mesh_coordinate_after_a_cached_op(0, 2) == (0,)
    assert mesh_coordinate_after_a_cached_op(1, 2) == (1,)
