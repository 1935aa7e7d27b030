"""The watchdog's hang rule (moetrain/watchdog.py): a phase past 90% of its collective timeout
is a hang only while this rank waits for another one; a slow phase that every rank is in, or a
lone process, is left alone."""

from __future__ import annotations

import json
import threading
import time

import pytest

from moetrain.config.schema import FaultConfig
from moetrain.watchdog import Watchdog


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
