"""The watchdog (moetrain/watchdog.py): its hang rule - a phase past 90% of its collective
timeout is a hang only while this rank waits for another one; a slow phase that every rank is in,
or a lone process, is left alone - and the two phases of the collective timeout."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moetrain.config.schema import FaultConfig
from moetrain.watchdog import Watchdog
from tests.harness import SMALL, build_trainer


@pytest.fixture
def hangs(monkeypatch):
    """The hangs declared, instead of os._exit."""
    seen: list[str] = []
    event = threading.Event()

    def record(self, what, lines=None, silent=None):
        seen.append(what)
        event.set()
        self._stop.set()

    monkeypatch.setattr(Watchdog, "_hang", record)
    return seen, event


def _beat(run_dir, rank, step, phase):
    beat = {"rank": rank, "host": "h", "pid": 1, "step": step, "phase": phase, "time": time.time()}
    (run_dir / "heartbeats" / f"rank{rank}.json").write_text(json.dumps(beat))


# init_timeout 1 s: the start-up phase acts after 0.9 s; heartbeats stay fresh (30 s).
CFG = FaultConfig(init_timeout=1.0, step_timeout=1.0, heartbeat_timeout=30.0)


def test_a_lone_process_in_a_long_phase_is_not_a_hang(tmp_path, hangs):
    seen, event = hangs
    dog = Watchdog(CFG, tmp_path, rank=0, world_size=1)
    assert not event.wait(2.5), seen  # 2.5x the phase's collective timeout
    dog.close()


def test_ranks_all_in_the_same_long_phase_are_not_a_hang(tmp_path, hangs):
    seen, event = hangs
    dog = Watchdog(CFG, tmp_path, rank=0, world_size=2)
    stop = threading.Event()

    def other_rank():  # alive, in the same phase as rank 0
        while not stop.wait(0.2):
            _beat(tmp_path, 1, -1, "start")

    beater = threading.Thread(target=other_rank)
    beater.start()
    try:
        assert not event.wait(2.5), seen
    finally:
        stop.set()
        beater.join()
        dog.close()


def test_a_long_phase_waiting_for_a_rank_behind_is_a_hang(tmp_path, hangs):
    seen, event = hangs
    dog = Watchdog(CFG, tmp_path, rank=0, world_size=2)
    dog.step(0)
    dog.step(1)  # rank 0 is in step 2 after its first step: the step timeout (1 s) applies
    _beat(tmp_path, 1, 0, "step")  # rank 1 is alive, still in step 1
    assert event.wait(5), "no hang declared"
    dog.close()
    assert "step 2 has not finished" in seen[0] and "90% of its collective timeout" in seen[0]


def test_the_collective_timeout_is_the_init_one_until_the_first_step_ends_then_the_step_one(
        tmp_path):
    """fault.init_timeout while starting and during the first step, fault.step_timeout from the
    second step on, the generous one again around each checkpoint save (torchtitan's two
    phases); read from the process group itself, a one-rank gloo group made with the init
    timeout as moetrain.runtime makes it (a Trainer's steps on one process)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=600))
    try:
        gloo = dist.group.WORLD._get_backend(torch.device("cpu"))
        trainer = build_trainer(tmp_path, [*SMALL, "train.max_steps=3", "checkpoint.every=2",
                                           "fault.init_timeout=600", "fault.step_timeout=60"])
        seen = [("built", 0, gloo.options._timeout.total_seconds())]
        next_step, save = trainer.sampler.next_step, trainer.ckpt.save

        def drawing():  # inside step N (1-based), before its forward
            seen.append(("step", trainer.state.step + 1, gloo.options._timeout.total_seconds()))
            return next_step()

        def saving(*args, **kwargs):  # the save after step N
            seen.append(("save", trainer.state.step, gloo.options._timeout.total_seconds()))
            return save(*args, **kwargs)

        trainer.sampler.next_step, trainer.ckpt.save = drawing, saving
        trainer.fit()
    finally:
        dist.destroy_process_group()
    assert seen == [("built", 0, 600), ("step", 1, 600), ("step", 2, 60), ("save", 2, 600),
                    ("step", 3, 60), ("save", 3, 600)]
