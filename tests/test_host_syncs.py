"""The host-sync budget of a training step: one read of the device per optimizer step (loss,
gradient norm, stop flags and routing statistics together) - also under expert parallelism with
the sync-free exchange (model.moe.ep_budget: ep2 and ep4; dropless, capacity, top-p with null
experts, recompute with the overlapped exchange), where an overflowing step is redone with one
more read; the exact-size exchange adds its count exchange, once per MoE layer and forward.

On the CPU nothing actually waits, so the test counts what would make a GPU step wait: host
reads (`.item()`/`float()`/`bool()` via aten._local_scalar_dense, `.tolist()`, `.cpu()`,
`.numpy()`) and ops whose output size depends on the data (nonzero, boolean indexing,
masked_select, bincount, unique, repeat_interleave without output_size). The optimizer's own
step is left out: on CUDA moetrain uses the fused AdamW, which reads nothing; torch's CPU
AdamW reads its step counters.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.model import moe_layers
from moetrain.trainer import Trainer
from tests.harness import build_trainer, run_distributed

DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default", "aten.bincount.default",
                  "aten._unique2.default", "aten.unique_dim.default",
                  "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor"}


class SyncCounter(TorchDispatchMode):
    """Counts host reads and data-dependent shapes while active (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            self.events.append(f"host read ({_caller()})")
        elif name in DATA_DEPENDENT and not (name.startswith("aten.repeat_interleave")
                                             and kwargs.get("output_size") is not None):
            self.events.append(f"{name} ({_caller()})")
        elif name == "aten.index.Tensor" and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.events.append(f"boolean index ({_caller()})")
        return func(*args, **kwargs)


def _caller() -> str:
    for frame in inspect.stack()[2:]:
        if "/moetrain/" in frame.filename and "/torch/" not in frame.filename:
            return f"{frame.filename.rsplit('/moetrain/', 1)[1]}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def count_reads():
    """Count host reads and data-dependent shapes inside: the aten ops (`SyncCounter`) and the
    Python-level reads (`Tensor.tolist/.cpu/.numpy`). Yields the events list and a one-item
    list whose True pauses the Python-level count."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}
    paused = [False]

    def wrap(name):
        def method(self, *args, **kwargs):
            if not paused[0]:
                counter.events.append(f"Tensor.{name} ({_caller()})")
            return originals[name](self, *args, **kwargs)
        return method

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter.events, paused
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def counting(trainer: Trainer):
    """Count during `train_step`, except inside `optimizer.step`; Python-level reads too."""
    step = trainer.optimizer.step
    with count_reads() as (events, paused):
        def optimizer_step(*args, **kwargs):
            paused[0] = True
            with torch.utils._python_dispatch._disable_current_modes():
                try:
                    return step(*args, **kwargs)
                finally:
                    paused[0] = False

        trainer.optimizer.step = optimizer_step
        try:
            yield events
        finally:
            trainer.optimizer.step = step


def _trainer(tmp_path, overrides, world_size=1):
    return build_trainer(tmp_path / "run", ["train.global_batch_size=4", "data.seq_len=32",
                                            *overrides], world_size)


def _count_step(trainer) -> list[str]:
    trainer.train_step(trainer.sampler.next_step())  # first step: lazy initialisation
    with counting(trainer) as events:
        trainer.train_step(trainer.sampler.next_step())
    return events


@pytest.mark.parametrize("overrides", [
    [],  # dropless
    ["model.moe.capacity_factor=1.0", "model.moe.lbl.scope=global"],  # dropping, global LBL
    ["model.moe.routing.top_p=0.5", "model.moe.routing.num_null_experts=2",
     "model.moe.routing.bias_rate=0.01", "model.moe.token_rounding=8"],
    ["train.recompute=full"],
    ["optim=muon", "optim.qk_clip_threshold=0.1"],  # the max logits ride in the one read
])
def test_one_host_read_per_step(tmp_path, overrides):
    events = _count_step(_trainer(tmp_path, overrides))
    assert len(events) == 1 and events[0].startswith("Tensor.tolist (parallel/step.py"), events


def _ep_events(rank, world_size, tmp_path):
    trainer = _trainer(tmp_path / f"r{rank}", ["parallel.ep=2"], world_size)
    return _count_step(trainer), len(moe_layers(trainer.model))


def test_expert_parallel_adds_only_the_count_exchange(tmp_path):
    # one micro-batch per rank: each MoE layer's forward exchanges its counts once
    results = run_distributed(_ep_events, 2, tmp_path, timeout=120)
    for events, n_layers in results:
        exchanges = [e for e in events if "parallel/expert_parallel.py" in e]
        others = [e for e in events if e not in exchanges]
        assert len(exchanges) == n_layers and all(e.startswith("Tensor.tolist") for e in exchanges)
        assert len(others) == 1 and others[0].startswith("Tensor.tolist (parallel/step.py"), events


# The sync-free exchange: a budget of ep x the balanced load covers any routing (a slot then
# holds every row a rank has), so no step overflows and each keeps its one read.
SYNC_FREE_CASES = {
    "dropless": [],
    "capacity": ["model.moe.capacity_factor=1.0", "model.moe.lbl.scope=global"],
    "top-p, null experts": ["model.moe.routing.top_p=0.5", "model.moe.routing.num_null_experts=2",
                            "model.moe.routing.bias_rate=0.01", "model.moe.token_rounding=8"],
    "recompute, overlap": ["train.recompute=full", "model.moe.ep_overlap=true"],
}


def _sync_free_events(rank, world_size, tmp_path):
    # one micro-batch per rank (dp = ep = world size)
    layout = [f"parallel.ep={world_size}", f"train.micro_batch_size={4 // world_size}"]
    events = {}
    for i, (name, overrides) in enumerate(SYNC_FREE_CASES.items()):
        trainer = _trainer(tmp_path / f"r{rank}-{i}",
                           [*layout, f"model.moe.ep_budget={world_size}", *overrides], world_size)
        events[name] = _count_step(trainer)
    # A budget below the balanced load: the step overflows, is redone, and reads once more.
    trainer = _trainer(tmp_path / f"r{rank}-overflow", [*layout, "model.moe.ep_budget=0.25"],
                       world_size)
    trainer.train_step(trainer.sampler.next_step())  # lazy initialisation; the budget grows
    trainer.moe.budget.factor = 0.25  # too small again for the counted step
    with counting(trainer) as counted:
        record, _ = trainer.train_step(trainer.sampler.next_step())
    events["overflow"] = (counted, record["ep_overflows"])
    return events


@pytest.mark.parametrize("world_size", [2, 4])
def test_sync_free_expert_parallelism_reads_the_device_once_per_step(tmp_path, world_size):
    for per_rank in run_distributed(_sync_free_events, world_size, tmp_path, timeout=300):
        for name in SYNC_FREE_CASES:
            events = per_rank[name]
            assert len(events) == 1 and events[0].startswith("Tensor.tolist (parallel/step.py"), \
                (name, events)
        events, redos = per_rank["overflow"]
        assert len(events) == 1 + redos and redos >= 1, events  # each redo's own read
        assert all(e.startswith("Tensor.tolist (parallel/step.py") for e in events)


def test_the_counter_sees_reads_and_dynamic_shapes():
    counter = SyncCounter()
    with counter:
        t = torch.arange(6)
        float(t.sum())
        t[t > 2]
        torch.bincount(t)
    assert len(counter.events) == 3


def _muon_events(rank, world_size, tmp_path):
    """The Muon part of the optimizer step (momentum, the whole-matrix exchange, Newton-Schulz,
    the update) and QK-clip, counted on their own: torch's AdamW part reads its step counters
    on the CPU (the fused CUDA one does not), Muon must read nothing."""
    trainer = _trainer(tmp_path / f"r{rank}", ["optim=muon", "parallel.tp=2",
                                               "optim.qk_clip_threshold=0.1"], world_size)
    trainer.train_step(trainer.sampler.next_step())
    counter = SyncCounter()
    muon_step, clip = trainer.optimizer._muon_step, trainer.qk_clip.apply_
    with counter:
        muon_step(trainer.optimizer._muon_group())
        clip(torch.full((4, 8), 1.0))
    return counter.events, trainer.optimizer.exchange.communicates


def test_muon_and_qk_clip_read_nothing_from_the_device(tmp_path):
    for events, communicates in run_distributed(_muon_events, 2, tmp_path, timeout=120):
        assert communicates and events == [], events
