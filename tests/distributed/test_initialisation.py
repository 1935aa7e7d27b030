"""Meta-device construction with the real `Trainer` on forked gloo ranks, several layouts per launch:

- the initial weights of every layout, gathered, are one process's bit for bit (and every
  buffer is one process's), also when each rank upcycles its shards from a dense checkpoint;
- no rank allocates a tensor with more elements than its own largest shard while the trainer
  builds the model (so no full-size tensor of a sharded parameter ever exists on it; upcycling
  also reads the dense checkpoint's tensors, one whole tensor at a time);
- the planner's per-rank parameter, gradient and optimizer bytes are what each rank really holds
  after initialisation and after the first step (within 5%);
- metrics.jsonl's `memory_peak_gib` is the maximum of the ranks' peaks (a spike on rank 1
  shows in rank 0's record), and the first record has `memory_init_peak_gib`.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain import memory
from moetrain.data import ensure_prepared
from moetrain.planning import memory_per_rank
from tests.distributed.equivalence import layout_config
from tests.harness import run_distributed, trainer_for

ONE_STEP = ["train.max_steps=1", "train.global_batch_size=4"]
TOLERANCE = 0.05
SPIKE = 256 * 2**20  # bytes


class LargestStorage(TorchDispatchMode):
    """The largest storage (in elements) any op outputs while active: a fresh allocation's
    size, or that of the storage a view shares. Subclass outputs (DTensors) are skipped; their
    local tensors are what is allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if type(t) is torch.Tensor and not t.is_meta:
                numel = t.untyped_storage().nbytes() // t.element_size()
                if numel > self.numel:
                    self.numel, self.op = numel, str(func)
        return out


def _own_largest(model) -> int:
    """Elements of the largest parameter storage this rank holds (FSDP2's padded shards)."""
    return max(memory.parameter_bytes(torch.nn.ParameterList([p])) // p.element_size()
               for p in model.parameters())


def _build_and_step(rank, world_size, jobs, references):
    torch.set_num_threads(1)
    # full_tensor() of FSDP-over-TP shards warns that it gathers in two steps
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    out = {}
    for name, cfg, run_dir in jobs:
        reference = references[name]
        with LargestStorage() as largest:
            trainer = trainer_for(cfg, run_dir)
        model = trainer.model
        mismatched, seen = [], []
        for n, p in model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            seen.append(n)
            if not torch.equal(full, reference[n]):
                mismatched.append(n)
        mismatched += [n for n, b in model.named_buffers() if not torch.equal(b, reference[n])]
        params = memory.parameter_bytes(model)
        if name == "dp2" and rank == 1:  # a spike only rank 1 has: metrics must report it
            model.register_forward_pre_hook(lambda *_: torch.ones(SPIKE // 4).sum() and None)
        trainer.fit()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                   .splitlines()] if rank == 0 else None
        plan = memory_per_rank(cfg, trainer.rank.dims)[trainer.rank.pp_rank]
        out[name] = dict(
            mismatched=mismatched, seen=seen, largest=largest.numel, largest_op=largest.op,
            own_largest=_own_largest(model), params=params,
            grads=memory.gradient_bytes(model), optimizer=memory.optimizer_bytes(trainer.optimizer),
            plan=(plan.weights, plan.grads, plan.optimizer), records=records,
            step_peak=trainer.step_peak_bytes)
    return out


def _run(world_size, layouts, tmp_path, dense_largest: int = 0):
    """dense_largest: elements of the largest tensor of the dense checkpoint the upcycled
    layouts read (one whole dense tensor at a time is what upcycling allocates beyond the
    shards)."""
    jobs, references, names = [], {}, {}
    for name, overrides in layouts.items():
        cfg = layout_config(world_size, [*ONE_STEP, *overrides])
        ensure_prepared(cfg.data, cfg.model.vocab_size)
        run_dir = tmp_path / f"w{world_size}-{name}"
        run_dir.mkdir()
        jobs.append((name, cfg, run_dir))
        # One process's trainer with the same model (upcycled where the layout is): its initial
        # state is what the layout must reproduce.
        model_only = [o for o in overrides if not o.startswith("parallel.")]
        single = layout_config(1, [*ONE_STEP, *model_only])
        model = trainer_for(single, tmp_path / f"single-{name}").model
        references[name] = {n: t.detach().clone() for n, t in [*model.named_parameters(),
                                                                *model.named_buffers()]}
        names[name] = {n for n, _ in model.named_parameters()}
    results = run_distributed(_build_and_step, world_size, jobs, references, timeout=600)
    for name, _, _ in jobs:
        per_rank = [r[name] for r in results]
        for rank, r in enumerate(per_rank):
            assert not r["mismatched"], f"{name} rank {rank}: not one process's: {r['mismatched']}"
            allowed = max(r["own_largest"], dense_largest if "upcycled" in name else 0)
            assert r["largest"] <= allowed, (
                f"{name} rank {rank}: {r['largest_op']} made a tensor of {r['largest']} elements, "
                f"more than any of its own shards ({r['own_largest']})")
            for key, planned in zip(("params", "grads", "optimizer"), r["plan"]):
                assert abs(r[key] - planned) <= TOLERANCE * planned, (
                    f"{name} rank {rank}: {key} {r[key]} B allocated, the planner says {planned:.0f}")
        (record,) = per_rank[0]["records"]
        assert record["memory_init_peak_gib"] > 0
        logged = record["memory_peak_gib"] * memory.GIB
        # the maximum over ranks of each rank's peak during the step
        assert logged == pytest.approx(max(r["step_peak"] for r in per_rank), rel=1e-12)
        if name == "dp2":  # rank 1's spike, not rank 0's own peak
            assert logged > per_rank[0]["step_peak"] + SPIKE // 2, (logged, per_rank[0]["step_peak"])
        every = {n for r in per_rank for n in r["seen"]}
        assert every == names[name], f"{name}: parameters missing"
        print(f"{name}: parameter bytes {[r['params'] for r in per_rank]}, planned "
              f"{[int(r['plan'][0]) for r in per_rank]}; largest tensor made "
              f"{max(r['largest'] for r in per_rank)} elements")


def _dense_run(tmp_path) -> tuple[list[str], int]:
    """A one-step dense run of the tiny model (every block a SwiGLU MLP of width 192), saved;
    returns the overrides that upcycle the MoE model from it and its largest tensor's size."""
    run_dir = tmp_path / "dense"
    cfg = layout_config(1, [*ONE_STEP, "model.moe.first_dense_layers=4", "model.ffn_hidden=192",
                            "checkpoint.every=1"])
    trainer = trainer_for(cfg, run_dir)
    trainer.fit()
    largest = max(p.numel() for p in trainer.model.parameters())
    return [f"model.init.upcycle_from={run_dir}", "model.ffn_hidden=192"], largest


def test_two_ranks_start_from_one_process_weights_and_hold_what_the_planner_says(tmp_path):
    upcycled, dense_largest = _dense_run(tmp_path)  # each rank upcycles its own shards
    _run(2, {
        "dp2": [],
        "dp2-replicated": ["parallel.fsdp.enabled=false"],
        "ep2": ["parallel.ep=2"],
        "etp2": ["parallel.etp=2"],
        "tp2": ["parallel.tp=2"],
        "pp2": ["parallel.pp=2"],
        # the MTP module on the last stage with its copy of the (tied) embedding: the copy
        # starts equal to the first stage's and the planner counts it
        "pp2-mtp-tied": ["parallel.pp=2", "model.mtp.depth=1", "model.tie_embeddings=true"],
        # 8 slices of the dense MLP over 8 experts: each EP rank's experts take other slices
        "ep2-upcycled": ["parallel.ep=2", *upcycled, "model.moe.expert_hidden=24",
                         "model.init.upcycle_granularity=8"],
        "pp2-upcycled": ["parallel.pp=2", *upcycled],
    }, tmp_path, dense_largest)


def test_four_ranks_folded_layouts(tmp_path):
    _run(4, {
        "tp2-ep2": ["parallel.tp=2", "parallel.ep=2"],  # FSDP over TP (2-D) and EP
        "pp2-ep2": ["parallel.pp=2", "parallel.ep=2", "train.micro_batch_size=1"],
        "dp4-ep2-tied": ["parallel.ep=2", "model.tie_embeddings=true", "train.micro_batch_size=1"],
        # Muon: one momentum buffer per matrix element (the planner's 4 B), AdamW's 8 B for the rest
        "tp2-ep2-muon": ["parallel.tp=2", "parallel.ep=2", "optim=muon"],
    }, tmp_path)
