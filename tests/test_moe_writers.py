"""One writer per piece of MoE state: during a whole training run on a layout that uses every
seam (EP folded over TP, PP, FSDP, the sparsity schedules, the aux-loss-free bias, an
evaluation), no code of moetrain outside `moetrain/model/moe/` sets an attribute of a MoE layer
or of its router, experts, load-balancing loss or dispatcher. Torch's own sharding (FSDP2,
DTensor's distribute_module) may replace parameters; the parallel code reaches the layer's
layout only through `MoELayer.use_layout`, and the trainer the per-step state only through
`MoEControl` (both live in model/moe/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moetrain.model.moe.dispatcher import TokenDispatcher
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.losses import LoadBalancingLoss
from moetrain.model.moe.router import Router
from tests.harness import build_trainer, run_distributed, tiny_model_config

PACKAGE = Path(__file__).resolve().parents[1] / "moetrain"
OWNER = PACKAGE / "model" / "moe"
CLASSES = (MoELayer, Router, GroupedExperts, LoadBalancingLoss, TokenDispatcher)


def _writer() -> str | None:
    """Where the attribute was set from when that is moetrain code outside model/moe/ (torch's
    own code, e.g. `Module.train` or FSDP2 swapping a parameter, is torch's business)."""
    frame = sys._getframe(2)
    path = Path(frame.f_code.co_filename)
    if PACKAGE in path.parents and OWNER not in path.parents:
        return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
    return None


def record_writes(monkeypatch) -> list[str]:
    writes: list[str] = []
    for cls in CLASSES:
        original = cls.__setattr__

        def setattr_(self, name, value, _original=original, _cls=cls.__name__):
            if (where := _writer()) is not None:
                writes.append(f"{_cls}.{name} from {where}")
            _original(self, name, value)

        monkeypatch.setattr(cls, "__setattr__", setattr_)
    return writes


OVERRIDES = ["train.max_steps=2", "train.eval_every=1", "model.moe.routing.bias_rate=0.01",
             "model.moe.schedule.top_k.kind=step", "model.moe.schedule.top_k.milestones=[[1,1]]",
             "model.moe.capacity_factor=1.0", "train.eval_capacity_factor=2.0"]


def _train(rank, world_size, tmp_path, overrides):
    mp = pytest.MonkeyPatch()
    try:
        writes = record_writes(mp)
        trainer = build_trainer(tmp_path / f"rank{rank}", [*OVERRIDES, *overrides], world_size)
        trainer.fit()
        return writes
    finally:
        mp.undo()


def test_the_recorder_sees_a_write_from_outside(monkeypatch):  # the tests below could fail
    writes = record_writes(monkeypatch)
    layer = MoELayer(8, tiny_model_config().moe)
    exec(compile("layer.top_k = 1", str(PACKAGE / "parallel" / "fake.py"), "exec"))
    assert writes and writes[0].startswith("MoELayer.top_k from moetrain/parallel/fake.py")
    layer.start_step(top_k=1, capacity_factor=None, aux_loss_scale=1.0)  # the owner's own
    assert len(writes) == 1


def test_one_process_run_writes_moe_state_only_through_model_moe(tmp_path):
    assert _train(0, 1, tmp_path, []) == []


def test_a_pipelined_expert_parallel_run_writes_moe_state_only_through_model_moe(tmp_path):
    layout = ["parallel.pp=2", "parallel.tp=2", "parallel.ep=2", "train.micro_batch_size=1"]
    assert run_distributed(_train, 4, tmp_path, layout, timeout=240) == [[]] * 4
