"""Checkpoint faults on one process (docs/faults.md): damaged files, a NaN streak, the rollback,
a full disk, a stale .partial, a crafted pickle. The runs are in-process Trainers of the tiny
experiment at a smaller size (faults do not depend on the model's size), a few steps each;
"exact" means every loss equals an uninterrupted run's, bit for bit (train.deterministic=true).
One uninterrupted run of 8 steps (`reference`) is both the losses to equal and the checkpoints
the damage tests start from (each on a copy)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moetrain.checkpoint import CheckpointError, CheckpointManager, TrainState
from moetrain.checkpoint.convert import inspect
from moetrain.trainer import TrainingError
from tests.harness import SMALL
from tests.test_trainer import build, poison

# optim.decay=constant: the learning rate does not depend on train.max_steps, so a run of 6
# steps is the first 6 steps of a run of 8. SMALL (the harness's): two layers (a dense one, then
# MoE: the entries damaged below), 2 micro-batches of one 32-token sequence.
RUN = ("train.eval_every=0", "train.deterministic=true", "optim.decay=constant",
       "checkpoint.every=2", "checkpoint.resume=auto", *SMALL)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a resumed run logs some steps again)."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "event" not in r}


def events(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "event" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of 8 steps with checkpoints at steps 4, 6 and 8 (keep_last=3);
    read-only: a test that changes it works on `copy_of` it."""
    run = tmp_path_factory.mktemp("reference") / "run"
    build(run, "train.max_steps=8", *RUN, "checkpoint.keep_last=3").fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_4", "step_6", "step_8"]
    return run


def copy_of(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def entry_bytes(step_dir: Path, prefix: str) -> tuple[Path, int, int]:
    """(file, offset, length) of the middle of the first stored entry whose key starts with
    `prefix`: inside the tensor's values, past its serialisation header, so without the checksum
    the damage would load silently (this test reads the metadata of a checkpoint it wrote)."""
    md = FileSystemReader(str(step_dir)).read_metadata()
    for index, info in sorted(md.storage_data.items(), key=lambda kv: kv[0].fqn):
        if index.fqn.startswith(prefix) and info.length >= 64:
            return step_dir / info.relative_path, info.offset + info.length // 2, 64
    raise AssertionError(f"no entry {prefix}* in {step_dir}")


def flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(run: Path, how: str) -> None:
    newest = run / "checkpoints" / "step_8"
    if how == "weights":
        flip(*entry_bytes(newest, "model.layers.1.moe.experts.w1")[:2])
    elif how == "optimizer":
        flip(*entry_bytes(newest, "optim.state.layers.1.moe.experts.w1.exp_avg_sq")[:2])
    elif how == "missing_file":
        next(newest.glob("*.distcp")).unlink()
    else:  # latest names a checkpoint that is gone
        shutil.rmtree(newest)


REJECTED = {"weights": r"\S+\.distcp does not match its checksum \(the file is corrupt\)",
            "optimizer": r"\S+\.distcp does not match its checksum \(the file is corrupt\)",
            "missing_file": r"\S+\.distcp is missing",
            "latest_dangling": r"\S+checksums\.json is missing"}


@pytest.mark.parametrize("how", list(REJECTED))
def test_a_damaged_newest_checkpoint_is_passed_over_loudly_and_the_run_ends_exact(
        tmp_path, reference, caplog, how):
    """The newest checkpoint (step_8) damaged: `resume=auto` says so and takes step_6, and the
    run trains steps 7 and 8 again to the uninterrupted run's losses, bit for bit."""
    run = copy_of(reference, tmp_path)
    damage(run, how)
    caplog.set_level(logging.WARNING, logger="moetrain")
    resumed = build(run, "train.max_steps=8", *RUN)
    assert resumed.resumed_from == run / "checkpoints" / "step_6"
    (rejected,) = resumed.rejected
    assert rejected.path == run / "checkpoints" / "step_8"
    assert re.search(REJECTED[how], rejected.reason), rejected.reason
    resumed.fit()  # the resume drops the records of steps 7 and 8 and logs them again
    assert losses(run) == losses(reference)  # steps 7, 8 again from step 6: bit-identical
    (fallback,) = [e for e in events(run) if e["event"] == "resume_fallback"]
    assert fallback["step"] == 6 and fallback["resumed_from"].endswith("step_6")
    assert fallback["rejected"][0]["path"].endswith("step_8")
    assert re.search(REJECTED[how], fallback["rejected"][0]["reason"])
    assert re.search(rf"passing over \S+step_8: {REJECTED[how]}", caplog.text)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_8"  # written again


def one_checkpoint(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference's step_4 as the only checkpoint of a run folder."""
    step = tmp_path / "run" / "checkpoints" / "step_4"
    shutil.copytree(reference / "checkpoints" / "step_4", step)
    return step


def test_an_explicit_resume_path_that_fails_verification_is_refused_naming_the_file(
        tmp_path, reference):
    step = one_checkpoint(reference, tmp_path)
    run = step.parents[1]
    shard, offset, _ = entry_bytes(step, "model.output.weight")
    flip(shard, offset)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(CheckpointError, match=rf"checkpoint.resume='{step}': {shard} does not "
                       r"match its checksum \(the file is corrupt\)$"):
        build(tmp_path / "other", "train.max_steps=8", *RUN, f"checkpoint.resume={step}")
    with pytest.raises(CheckpointError, match="does not match its checksum"):  # the tools too
        inspect(step)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched


def test_a_crafted_metadata_pickle_is_refused_before_it_is_unpickled(tmp_path, reference):
    """A checkpoint is code: a .metadata that runs a command when unpickled. The checksum check
    comes first, so the command never runs (a crafted checkpoint with matching checksums would
    run it: load only trusted checkpoints, docs/faults.md)."""
    step = one_checkpoint(reference, tmp_path)
    witness = tmp_path / f"pwned-{uuid.uuid4().hex}"

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(witness)],))

    (step / ".metadata").write_bytes(pickle.dumps(Payload()))
    for load in (lambda: inspect(step),
                 lambda: build(tmp_path / "b", "train.max_steps=8", *RUN,
                               f"checkpoint.resume={step}")):
        with pytest.raises(CheckpointError, match=r"\.metadata has \d+ bytes, its checksum "
                                                  r"record says \d+"):
            load()
    assert not witness.exists()


def test_a_nan_streak_writes_no_checkpoint_prunes_nothing_and_stops(tmp_path):
    """keep_last=1: the streak's checkpoint (step 4, due inside the streak: the streak's last
    step raises before any save) would have replaced the last good one."""
    run = tmp_path / "run"
    trainer = build(run, "train.max_steps=8", *RUN, "checkpoint.keep_last=1",
                    "train.max_bad_steps=2")
    poison(trainer, set(range(4, 9)))  # from step 4 on, every step is NaN
    with pytest.raises(TrainingError, match=r"2 steps in a row .*stopping at step 5; no "
                       r"checkpoint was written during the streak"):
        trainer.fit()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]
    # a resume continues from the good checkpoint, not from a poisoned one
    assert build(run, "train.max_steps=8", *RUN).resumed_from == ckpts / "step_2"


def test_rollback_reloads_the_last_good_checkpoint_and_skips_the_streaks_batches(tmp_path):
    run = tmp_path / "run"
    trainer = build(run, "train.max_steps=4", *RUN, "train.max_bad_steps=2",
                    "train.on_bad_steps=rollback")
    good = {}
    drawn = []
    next_step = trainer.sampler.next_step
    forward = trainer.model.forward

    def transient_nan(*args, **kwargs):  # the 3rd and 4th steps run, once: a passing fault
        out = forward(*args, **kwargs)
        return out * math.nan if len(drawn) in (3, 4) else out

    trainer.model.forward = transient_nan

    def spy():
        batches = next_step()
        drawn.append(batches)
        if trainer.state.step == 2 and not good:  # the weights of the step_2 checkpoint
            good.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        if len(drawn) == 5:  # the first step after the rollback: weights back at step 2
            assert trainer.state.step == 2
            for n, p in trainer.model.named_parameters():
                assert torch.equal(p, good[n]), n
        return batches

    trainer.sampler.next_step = spy
    trainer.fit()
    assert trainer.state.step == 4 and len(drawn) == 6  # 4 + (4 - 2): two batches skipped
    (roll,) = [e for e in events(run) if e["event"] == "rollback"]
    assert roll["step"] == 4 and roll["to_step"] == 2 and roll["resumed_from"].endswith("step_2")
    assert all(math.isfinite(v) for v in losses(run).values())  # the last record of each step
    # the steps after the rollback go on through the data: not the streak's batches again
    assert drawn[4] not in drawn[:4]


def test_a_rollback_without_progress_since_the_last_one_stops(tmp_path):
    """max_bad_steps=1: step 3 rolls back to step_2, and step 3 is NaN again."""
    trainer = build(tmp_path, "train.max_steps=8", *RUN, "train.max_bad_steps=1",
                    "train.on_bad_steps=rollback")
    poison(trainer, set(range(3, 9)))  # the weights make every step NaN from step 3 on
    drawn = []
    next_step = trainer.sampler.next_step

    def bounded():  # a rollback loop that does not stop fails here rather than hanging
        drawn.append(None)
        assert len(drawn) <= 4, "still training after a rollback without progress"
        return next_step()

    trainer.sampler.next_step = bounded
    with pytest.raises(TrainingError, match=r"again after rolling back to \S+step_2: no progress"):
        trainer.fit()


def test_a_start_removes_partial_folders_left_by_crashes(tmp_path, reference, caplog):
    """The start of a finished run (resumed at its last step, no step to train) is enough."""
    run = copy_of(reference, tmp_path)
    stale = run / "checkpoints" / "step_7.partial"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"x" * 1000)
    caplog.set_level(logging.WARNING, logger="moetrain")
    build(run, "train.max_steps=8", *RUN).fit()
    assert not stale.exists() and f"removed {stale}" in caplog.text


def test_the_last_step_at_max_time_leaves_no_preempted_marker(tmp_path):
    """Nor does a stale one survive: a run stopped early wrote it, and the start-up of the next
    run died before clearing it (launch/slurm/train.sbatch removes it too, before the ranks
    start: tests/launch/test_sbatch_command.py). A marker after this finished run would have the
    batch script requeue it."""
    (tmp_path / "preempted").write_text("step 4: received SIGUSR1\n")
    trainer = build(tmp_path, "train.max_steps=1", *RUN, "train.max_time=0.001")
    trainer.fit()
    assert trainer.state.step == 1 and not (tmp_path / "preempted").exists()


# --------------------------------------------------------------------------- a full disk
def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return model, opt


def _checkpoint_bytes(where: Path) -> int:
    model, opt = _tiny()
    path = CheckpointManager(where, keep_last=None).save(model, opt, TrainState(step=1), meta={})
    return sum(f.stat().st_size for f in path.iterdir())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of 1.6 checkpoints of `_tiny`: one fits, two do not. Needs root."""
    size = _checkpoint_bytes(tmp_path / "probe")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    kib = int(1.6 * size) // 4096 * 4
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_refuses_early_or_fails_cleanly_and_keeps_the_good_checkpoint(small_tmpfs):
    model, opt = _tiny()
    mgr = CheckpointManager(small_tmpfs, keep_last=1)
    state = TrainState(step=1)
    first = mgr.save(model, opt, state, meta={})
    # a second one does not fit next to it: refused before a byte is written
    with pytest.raises(CheckpointError, match=r"^not saving step_2: not enough free space for a "
                       r"checkpoint in \S+: [\d.]+ MiB free, the last checkpoint \(step_1\) took"):
        mgr.save(model, opt, TrainState(step=2), meta={})
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_1"]
    # the disk fills up during the write (the estimate said it fits): one line, no .partial
    shutil.rmtree(first)  # no previous checkpoint to estimate from; latest now dangles
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 20_000))
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint \S+step_3\.partial: No "
                       r"space left on device"):
        mgr.save(model, opt, TrainState(step=3), meta={})
    assert not (mgr.root / "step_3.partial").exists()
    assert (mgr.root / "latest").read_text().strip() == "step_1"
    os.unlink(ballast)
