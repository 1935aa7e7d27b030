"""moetrain.parallel.pipeline (split, stages, schedule) against one process: loss, every
gradient, grad norm, routing statistics.

One launch per world size (2, 4 ranks) runs every schedule on the tiny experiment's model
(8 layers) and a fixed batch of token ids, with nonzero LBL and z-loss coefficients, and
compares each with the full model run over the same micro-batches in the parent process: two
steps (the schedule is re-used), an eval step between train steps for some, 1-D and 2-D
positions, the global LBL scope, an uneven explicit split (parallel.pp_layers), and pp2 x dp2
with FSDP2 on the stages. Gradients are bit-identical to one process's except where
DP sums them (pp2 x dp2) and the grad norm (per-stage partial sums).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed.fsdp  # noqa: F401 - imported in the parent for the forked ranks
import torch.nn.functional as F

from moetrain.model import MoEControl, Transformer, moe_layers
from moetrain.parallel.data_parallel import apply_data_parallel
from moetrain.parallel.dims import LayoutError, ParallelDims
from moetrain.parallel.grad_norm import grad_sq_norm_share
from moetrain.parallel.mesh import build_meshes
from moetrain.parallel.pipeline.schedule import (
    _boundary_check, build_pipeline, pipeline_eval_step, pipeline_train_step,
)
from moetrain.parallel.pipeline.split import rank_layers, split_layers, stage_indices
from moetrain.parallel.pipeline.stages import RankModel, build_stage_modules
from moetrain.parallel.loss import StepLoss
from tests.harness import run_distributed, tiny_model_config

N_MB, MB, SEQ = 4, 2, 32  # micro-batches per step and DP rank, sequences each, tokens per sequence
TOKENS = N_MB * MB * SEQ  # tokens of one DP rank's step
RTOL = 1e-5
coords = [ParallelDims(4, pp=2).dense_coord(rank) for rank in range(4)]  # pp2 x dp2 on 4 ranks


def _model_cfg(scope: str = "micro"):
    return tiny_model_config("model.n_layers=8", "model.moe.lbl.coeff=0.1",
                             "model.moe.z_loss_coeff=0.01", f"model.moe.lbl.scope={scope}",
                             "model.moe.capacity_factor=null")


def _sum_over(value, group) -> torch.Tensor:
    """A value only some ranks have (the last stage's loss sum; stage rows): summed over `group`."""
    out = torch.zeros((), dtype=torch.float64) if value is None else value.clone()
    torch.distributed.all_reduce(out, group=group)
    return out


def _control(module, model_cfg, micro_batches: int) -> MoEControl:
    """The trainer's MoE control surface over this rank's part of the model."""
    return MoEControl(module, model_cfg.moe,
                      num_moe_layers=model_cfg.n_layers - model_cfg.moe.first_dense_layers,
                      micro_batches_per_step=micro_batches)


def _stage_stats(control: MoEControl, group):
    """Every MoE layer's step statistics, this rank's layers' rows summed with the other stages'."""
    stats = control.step_stats()
    return stats.columns.view(_sum_over(stats.rows_LC, group))


def _grad_norm(params, stages: int) -> float:
    """The trainer's global norm: each rank's share (replicas counted once), summed everywhere."""
    world = torch.distributed.get_world_size()
    share = grad_sq_norm_share(params, world // stages)
    torch.distributed.all_reduce(share)
    return float(share.sqrt())


def _check_stats(res, got, want) -> None:
    assert torch.equal(got.tokens_per_expert, want.tokens_per_expert)
    for key in ("dropped", "assignments", "tokens", "forwards"):
        assert torch.equal(got.scalar(key), want.scalar(key)), key
    for key in ("lbl", "z_loss", "entropy"):
        _track(res, "stats_err", _rel(got.scalar(key), want.scalar(key)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _reference(model: Transformer, tokens: torch.Tensor, aux: bool = True) -> dict:
    """The single-process step: the trainer's per-micro-batch loop over the full model, over
    every micro-batch of `tokens` (all data-parallel ranks' micro-batches)."""
    n_mb, tokens_per_step = tokens.shape[0] // MB, tokens.shape[0] * SEQ  # tokens: [B, SEQ + 1]
    model = copy.deepcopy(model).train()
    if not aux:
        for layer in moe_layers(model):
            layer.lbl_coeff = layer.z_loss_coeff = 0.0
    control = _control(model, model.cfg, n_mb)
    control.start_step(0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for mb in range(n_mb):
        batch = tokens[mb * MB:(mb + 1) * MB]
        logits = model(batch[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        (ce / tokens_per_step).backward()
        loss_sum += ce.detach().double()
    stats = control.step_stats()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    with torch.no_grad():
        model.eval()
        eval_sum = sum(F.cross_entropy(model(tokens[mb * MB:(mb + 1) * MB, :-1]).flatten(0, 1),
                                       tokens[mb * MB:(mb + 1) * MB, 1:].flatten(),
                                       reduction="sum").double() for mb in range(n_mb))
    return dict(grads=grads, loss=loss_sum, norm=float(norm), stats=stats, eval=float(eval_sum))


def _run_cases(rank: int, world_size: int, models, all_tokens, refs, cases):
    group = torch.distributed.group.WORLD
    tokens = all_tokens[:N_MB * MB]
    out = {}
    for name, model_key, schedule, vpp, extra in cases:
        start = time.perf_counter()
        ref = refs[model_key]
        cfg = models[model_key].cfg
        stage_modules = build_stage_modules(copy.deepcopy(models[model_key]), rank, world_size,
                                            vpp, extra.get("layers"))
        pipe = build_pipeline(
            stage_modules, schedule=schedule, group=group, device=torch.device("cpu"),
            n_microbatches=N_MB, micro_batch_size=MB, seq_len=SEQ, d_model=cfg.d_model,
            vocab_size=cfg.vocab_size, loss=StepLoss())
        control = _control(pipe.model, cfg, N_MB)
        modules = [sm.module for sm in pipe.stage_modules]
        positions = {None: None, "1d": torch.arange(SEQ),
                     "2d": torch.arange(SEQ).repeat(N_MB * MB, 1)}[extra.get("positions")]
        res = {"names": [n for n, _ in pipe.model.named_parameters()]}
        phases = ["train", "train"] + (["eval", "train"] if extra.get("eval") else [])
        for phase in phases:  # the schedule and stages are re-used, across a mode switch too
            if phase == "eval":
                for m in modules:
                    m.eval()
                pipe.loss.start(TOKENS)
                local = pipeline_eval_step(pipe, tokens[:, :-1], tokens[:, 1:], positions=positions)
                loss = float(_sum_over(local, group))
                _track(res, "eval_err", abs(loss - ref["eval"]) / ref["eval"])
                continue
            for m in modules:
                m.train()
                m.zero_grad(set_to_none=True)
            control.start_step(0)
            pipe.loss.start(TOKENS)
            local = pipeline_train_step(pipe, tokens[:, :-1], tokens[:, 1:], positions=positions)
            assert (local is not None) == pipe.is_last
            loss = _sum_over(local, group)
            _track(res, "loss_err", abs(float(loss) - float(ref["loss"])) / float(ref["loss"]))
            for n, p in pipe.model.named_parameters():
                _track(res, "grad_err", _rel(p.grad, ref["grads"][n]))
            norm = _grad_norm(list(pipe.model.parameters()), stages=world_size)
            _track(res, "norm_err", abs(norm - ref["norm"]) / ref["norm"])
            _check_stats(res, _stage_stats(control, group), ref["stats"])
        res["seconds"] = time.perf_counter() - start
        out[name] = res
    return out


def _track(res: dict, key: str, value: float) -> None:
    res[key] = max(res.get(key, 0.0), value)


def _check(results: list[dict], refs: dict, cases) -> None:
    for name, model_key, *_ in cases:
        per_rank = [r[name] for r in results]
        names = [n for r in per_rank for n in r["names"]]
        assert len(names) == len(set(names)), f"{name}: a parameter on two stages"
        assert set(names) == set(refs[model_key]["grads"]), f"{name}: parameters missing"
        for r in per_rank:
            for key in ("loss_err", "grad_err", "norm_err", "stats_err", "eval_err"):
                if key in r:
                    assert r[key] < RTOL, f"{name}: {key} = {r[key]:.2e}"
        errors = ", ".join(f"{k} {max(r[k] for r in per_rank):.1e}"
                           for k in ("loss_err", "grad_err", "norm_err", "stats_err", "eval_err")
                           if k in per_rank[0])
        print(f"pp{len(results)} {name}: {errors}, {max(r['seconds'] for r in per_rank):.1f} s")


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs 10x slower on two threads of a busy machine
    try:
        yield _setup()
    finally:
        torch.set_num_threads(threads)


def _setup():
    torch.manual_seed(0)
    models = {scope: Transformer(_model_cfg(scope)) for scope in ("micro", "global")}
    cfg = models["micro"].cfg
    tokens = torch.randint(0, cfg.vocab_size, (2 * N_MB * MB, SEQ + 1))  # two DP ranks' worth
    refs = {key: _reference(m, tokens[:N_MB * MB]) for key, m in models.items()}
    refs["dp2"] = _reference(models["micro"], tokens)
    # The aux losses reach the router gradients measurably (so a PP that lost them would fail).
    no_aux = _reference(models["micro"], tokens, aux=False)
    router = "layers.3.moe.router.weight"
    assert _rel(no_aux["grads"][router], refs["micro"]["grads"][router]) > 1e-3
    return models, tokens, refs


def test_pp2_schedules_equal_single_process(setup):
    models, tokens, refs = setup
    cases = [
        ("gpipe", "micro", "gpipe", 1, {"eval": True}),
        ("1f1b-positions", "micro", "1f1b", 1, {"positions": "1d"}),
        ("interleaved-vpp2", "micro", "interleaved", 2, {}),
        ("zero_bubble", "micro", "zero_bubble", 1, {}),
        ("zero_bubble-vpp2", "micro", "zero_bubble", 2, {"eval": True}),
        ("1f1b-global-lbl", "global", "1f1b", 1, {}),
        ("interleaved-global-lbl", "global", "interleaved", 2, {}),
    ]
    results = run_distributed(_run_cases, 2, models, tokens, refs, cases, timeout=120)
    _check(results, refs, cases)


def test_pp4_schedules_equal_single_process(setup):
    models, tokens, refs = setup
    cases = [
        ("gpipe", "micro", "gpipe", 1, {}),
        ("1f1b-uneven", "micro", "1f1b", 1, {"layers": [1, 3, 3, 1]}),
        ("interleaved-vpp2", "micro", "interleaved", 2, {"eval": True, "positions": "2d"}),
        ("zero_bubble-vpp2", "micro", "zero_bubble", 2, {}),
    ]
    results = run_distributed(_run_pp4_and_pp2_dp2, 4, models, tokens, refs, cases, timeout=150)
    _check([r["pp4"] for r in results], refs, cases)
    by_dp = [[r["pp2xdp2"] for r, c in zip(results, coords) if c.dp == dp] for dp in range(2)]
    for dp in range(2):  # each DP replica's stages hold every parameter once
        names = [n for r in by_dp[dp] for n in r["names"]]
        assert sorted(names) == sorted(refs["dp2"]["grads"])
    errors = {k: max(r["pp2xdp2"][k] for r in results)
              for k in ("loss_err", "grad_err", "norm_err", "stats_err")}
    print("pp2 x dp2 FSDP interleaved:", errors)
    assert all(v < RTOL for v in errors.values()), errors


def _run_pp4_and_pp2_dp2(rank, world_size, models, tokens, refs, cases):
    return {"pp4": _run_cases(rank, world_size, models, tokens, refs, cases),
            "pp2xdp2": _run_pp_fsdp(rank, models["micro"], tokens, refs["dp2"])}


def _run_pp_fsdp(rank: int, model, tokens, ref) -> dict:
    """pp2 x dp2 with FSDP2 on every stage (the data-parallel code's `apply_data_parallel`): torch's
    stages defer FSDP's reduce-scatter to the end of the step; gradients, loss (summed over pp,
    then dp), grad norm (DTensor shards + pp) and routing statistics equal one process's."""
    dims = ParallelDims(4, pp=2)
    meshes = build_meshes(dims, "cpu")
    pp_rank, dp_rank = coords[rank].pp, coords[rank].dp
    stage_modules = build_stage_modules(copy.deepcopy(model), pp_rank, 2, 2)
    for sm in stage_modules:
        apply_data_parallel(sm.module, meshes)
    pipe = build_pipeline(
        stage_modules, schedule="interleaved", group=meshes.group("pp"), device=torch.device("cpu"),
        n_microbatches=N_MB, micro_batch_size=MB, seq_len=SEQ, d_model=model.cfg.d_model,
        vocab_size=model.cfg.vocab_size, loss=StepLoss())
    mine = tokens[dp_rank * N_MB * MB:(dp_rank + 1) * N_MB * MB]
    res = {"names": [n for n, _ in pipe.model.named_parameters()]}
    control = _control(pipe.model, model.cfg, 2 * N_MB)  # the global micro-batches
    for _ in range(2):  # the trainer's calls, on the rank's RankModel
        pipe.model.train()
        pipe.model.zero_grad(set_to_none=True)
        control.start_step(0)
        pipe.loss.start(2 * TOKENS)
        local = pipeline_train_step(pipe, mine[:, :-1], mine[:, 1:])
        loss = _sum_over(local, meshes.group("pp"))
        torch.distributed.all_reduce(loss, group=meshes.group("dp_cp"))
        _track(res, "loss_err", abs(float(loss) - float(ref["loss"])) / float(ref["loss"]))
        for n, p in pipe.model.named_parameters():
            _track(res, "grad_err", _rel(p.grad.full_tensor(), ref["grads"][n]))
        norm = _grad_norm(list(pipe.model.parameters()), stages=2)
        _track(res, "norm_err", abs(norm - ref["norm"]) / ref["norm"])
        # every rank: pp for the layers, dp for the tokens
        _check_stats(res, _stage_stats(control, None), ref["stats"])
    return res


# ------------------------------------------------------------------------ split, no processes

def test_split_layers_even_and_explicit():
    assert split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_layers(10, 4, layers_per_stage=[2, 3, 3, 2]) == [
        [0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    assert split_layers(5, 2, layers_per_stage=[0, 5]) == [[], [0, 1, 2, 3, 4]]
    assert stage_indices(1, 4, 2) == [1, 5]
    assert rank_layers(8, 1, 2, 2) == [2, 3, 6, 7]  # stages 1 and 3 of 4


@pytest.mark.parametrize("kwargs, keys", [
    (dict(n_layers=3, pp=4), ("model.n_layers", "parallel.pp", "parallel.vpp")),
    (dict(n_layers=10, pp=4), ("model.n_layers", "parallel.pp", "parallel.vpp")),
    (dict(n_layers=8, pp=2, layers_per_stage=[4, 3]), ("parallel.pp_layers", "model.n_layers")),
    (dict(n_layers=8, pp=2, layers_per_stage=[8]),
     ("parallel.pp_layers", "parallel.pp", "parallel.vpp")),
    (dict(n_layers=8, pp=4, layers_per_stage=[4, 0, 2, 2]), ("parallel.pp_layers",)),
])
def test_split_layers_errors(kwargs, keys):
    with pytest.raises(LayoutError) as err:
        split_layers(**kwargs)
    assert err.value.keys == keys


def test_stage_modules():
    cfg = _model_cfg()
    model = Transformer(cfg)
    full = dict(model.named_parameters())
    full_keys = list(model.state_dict())
    first, middle = build_stage_modules(model, 0, 2, 2)  # stages 0 and 2 of 4
    assert (first.index, middle.index, first.layer_ids, middle.layer_ids) == (0, 2, [0, 1], [4, 5])
    assert first.module.tok_embeddings is not None and first.module.output is None
    assert middle.module.tok_embeddings is None and middle.module.norm is None
    assert list(middle.module.layers.keys()) == ["4", "5"]
    for name, p in middle.module.named_parameters():  # moved, not copied
        assert p is full[name]
    # the model is consumed: the other stages' parts are dropped with it
    assert len(model.layers) == 0 and model.tok_embeddings is None and model.output is None
    # the rank's view for optimizer and checkpoints: full-model names and order, same tensors
    rank_model = RankModel([middle, first])
    mine = ("tok_embeddings.", "layers.0.", "layers.1.", "layers.4.", "layers.5.")
    assert list(rank_model.state_dict()) == [n for n in full_keys if n.startswith(mine)]
    stage_params = [*first.module.parameters(), *middle.module.parameters()]
    assert all(p is q for p, q in zip(rank_model.parameters(), stage_params, strict=True))
    # a stage whose output is not the declared boundary fails loudly, before anything is sent
    check = _boundary_check(torch.empty(MB, SEQ, cfg.d_model, device="meta"))
    check(None, (), torch.zeros(MB, SEQ, cfg.d_model))
    with pytest.raises(RuntimeError, match="activation_dtype"):
        check(None, (), torch.zeros(MB, SEQ, cfg.d_model, dtype=torch.bfloat16))
