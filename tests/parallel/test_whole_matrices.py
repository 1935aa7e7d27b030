"""moetrain.parallel.whole_matrices: every matrix of sharded parameters gathered whole on one
owner, a function applied there, the result back in the shards - for any mesh and placements
(Shard, FSDP2's _StridedShard, Replicate, uneven shards, plain tensors), bit for bit against
the function applied to `full_tensor()`."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

# Imported in the parent for the forked ranks (tests/harness/launcher.py).
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401
from moetrain.model import Transformer
from moetrain.model.init import init_parameters
from moetrain.optim.muon import newton_schulz
from moetrain.parallel import ParallelDims
from moetrain.parallel.parallelize import BatchShape, parallelize
from moetrain.parallel.rank import RankLayout
from moetrain.parallel.whole_matrices import MatrixExchange, shard_indices
from tests.harness import run_distributed, tiny_config

# name -> (global shape, placements on the (2, 2) mesh ("a", "b")); None: a plain tensor
CASES = {
    "replicated-rows": ((12, 10), (Replicate(), Shard(0))),  # replicas on "a": HSDP / DP
    "cols-rows": ((12, 10), (Shard(1), Shard(0))),
    "uneven": ((9, 7), (Shard(0), Shard(1))),  # 5 + 4 rows, 4 + 3 columns
    "experts-uneven-cols": ((3, 8, 6), (Shard(0), Shard(2))),  # 2 + 1 experts, ETP-like cut
    "experts-fsdp-over-ep": ((4, 8, 6), (_StridedShard(0, split_factor=2), Shard(0))),  # whole
    "rows-fsdp-over-tp": ((16, 8), (_StridedShard(0, split_factor=2), Shard(0))),
    "replicated": ((6, 6), (Replicate(), Replicate())),
    "plain": ((5, 4), None),
}


def _nonlinear(m: torch.Tensor) -> torch.Tensor:
    """Depends on the whole matrix (a shard would give another result); float64."""
    return m @ m.T @ m / (1 + m.norm())


def _expected(full: torch.Tensor, fn) -> torch.Tensor:
    return torch.stack([fn(m) for m in full]) if full.ndim == 3 else fn(full)


def _at_my_indices(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    index = [torch.tensor(list(ix), dtype=torch.long) for ix in shard_indices(param)]
    return full[torch.meshgrid(*index, indexing="ij")]


def _synthetic(rank, world_size):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    gen = torch.Generator().manual_seed(7)
    params, fulls = [], {}
    for name, (shape, placements) in CASES.items():
        full = torch.randn(*shape, generator=gen)
        fulls[name] = full
        p = full.clone() if placements is None else distribute_tensor(full, mesh, placements)
        params.append((name, torch.nn.Parameter(p)))
    exchange = MatrixExchange(params)
    local = [p.to_local() if isinstance(p, DTensor) else p for _, p in params]
    bad = []
    # bf16 Newton-Schulz (Muon's): the same bits as on the full matrix
    outs = exchange.apply([x.detach().bfloat16() for x in local], lambda m: newton_schulz(m, 5))
    for (name, p), out in zip(params, outs):
        want = _expected(fulls[name].bfloat16(), lambda m: newton_schulz(m, 5))
        if not torch.equal(out, _at_my_indices(want, p)):
            bad.append(f"bf16 {name}")
    outs = exchange.apply([x.detach().double() for x in local], _nonlinear)
    for (name, p), out in zip(params, outs):
        if not torch.allclose(out, _at_my_indices(_expected(fulls[name].double(), _nonlinear), p),
                              rtol=1e-12, atol=0):
            bad.append(f"fp64 {name}")
    whole_experts = MatrixExchange([params[list(CASES).index("experts-fsdp-over-ep")]])
    return (bad, exchange.communicates, exchange.owned_cost(),
            whole_experts.communicates, whole_experts.bytes_per_apply(2))


def _real_model(rank, world_size):
    """The tiny model at tp2 x ep2 x etp2 with FSDP: dense rows under _StridedShard over TP,
    columns of wo / w2, expert stacks cut in their hidden dim."""
    cfg = tiny_config(["parallel.tp=2", "parallel.ep=2", "parallel.etp=2"], world_size)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    with torch.device("meta"):  # as the trainer builds it
        model = Transformer(cfg.model)
    model, _ = parallelize(model, RankLayout.create(dims, torch.device("cpu")), cfg.parallel,
                           BatchShape(2, 2, cfg.data.seq_len))
    init_parameters(model, cfg.model, cfg.train.seed)
    params = [(n, p) for n, p in model.named_parameters()
              if ".attention.w" in n or ".mlp.w" in n or ".experts.w" in n]
    exchange = MatrixExchange(params)
    outs = exchange.apply([p.to_local().detach().bfloat16() for _, p in params],
                          lambda m: newton_schulz(m, 5))
    bad = [name for (name, p), out in zip(params, outs) if not torch.equal(
        out, _at_my_indices(_expected(p.full_tensor().detach().bfloat16(),
                                      lambda m: newton_schulz(m, 5)), p))]
    return bad, exchange.owned_cost()


@pytest.fixture(scope="module")
def four_ranks():
    return (run_distributed(_synthetic, 4, timeout=120),
            run_distributed(_real_model, 4, timeout=240))


def test_every_placement_gives_the_function_of_the_whole_matrix(four_ranks):
    synthetic, _ = four_ranks
    for rank, (bad, communicates, _, _, _) in enumerate(synthetic):
        assert not bad, f"rank {rank}: {bad}"
        assert communicates


def test_whole_experts_stay_on_their_rank(four_ranks):
    """FSDP over EP leaves each expert whole on one rank: it is its own owner, nothing moves."""
    synthetic, _ = four_ranks
    for *_, communicates, sent in synthetic:
        assert not communicates and sent == {"sent": 0, "received": 0}


def test_owners_share_the_work(four_ranks):
    synthetic, real = four_ranks
    costs = [cost for *_, cost, _, _ in synthetic]
    assert min(costs) > 0
    for rank, (bad, _) in enumerate(real):
        assert not bad, f"rank {rank}: {bad}"
    real_costs = [cost for _, cost in real]
    # longest-processing-time first over the tiny model's 33 matrices: within 10% of even
    assert max(real_costs) <= 1.1 * sum(real_costs) / len(real_costs), real_costs


def test_one_process_applies_the_function_to_each_matrix():
    gen = torch.Generator().manual_seed(1)
    stack, matrix = torch.randn(3, 4, 5, generator=gen), torch.randn(6, 2, generator=gen)
    exchange = MatrixExchange([("stack", stack), ("matrix", matrix)])
    out_stack, out_matrix = exchange.apply([stack.double(), matrix.double()], _nonlinear)
    assert torch.equal(out_stack, _expected(stack.double(), _nonlinear))
    assert torch.equal(out_matrix, _nonlinear(matrix.double()))
    assert not exchange.communicates
    assert shard_indices(stack) == [range(3), range(4), range(5)]


def test_a_parameter_that_is_not_a_matrix_is_refused():
    with pytest.raises(ValueError, match="norm: 1-D"):
        MatrixExchange([("norm", torch.ones(4))])
