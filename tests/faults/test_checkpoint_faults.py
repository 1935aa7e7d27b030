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
import pickle
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from moetrain.checkpoint import CheckpointError, storage
from moetrain.checkpoint.convert import inspect
from moetrain.trainer import TrainingError
from tests.harness import SMALL, run_train
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
@pytest.fixture
def tmpfs(tmp_path):
    """A 32 MiB tmpfs of its own, for the run directory (a full disk must not fill the test's
    temporary folder). Needs root."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_during_a_save_keeps_the_good_checkpoint_which_resumes_exact(
        tmpfs, reference, monkeypatch):
    """The run directory on a tmpfs; checkpoints at steps 2 and 4, keep_last=1.

    1. Step 4's save passes the free-space check (step_2's size fits), then another writer
       fills the disk to half a checkpoint: the write fails with one line naming the folder
       and the cause, `.partial` removed, step_2 kept and `latest` on it.
    2. The command line on that full disk resumes from step_2 (it verifies), trains steps 3 and
       4 again to the uninterrupted run's losses, and refuses step 4's save before writing a
       byte: one line naming the folder and the cause, exit 2, step_2 kept."""
    run = tmpfs / "run"
    ckpts = run / "checkpoints"
    args = ("train.max_steps=4", *RUN, "checkpoint.keep_last=1")
    ballast = tmpfs / "ballast"
    check = storage.space_problem

    def then_the_disk_fills(root, previous):
        problem = check(root, previous)
        if problem is None and previous and previous.is_dir() and not ballast.exists():
            left = storage.directory_bytes(previous) // 2
            ballast.write_bytes(bytes(shutil.disk_usage(tmpfs).free - left))
        return problem

    monkeypatch.setattr(storage, "space_problem", then_the_disk_fills)
    with pytest.raises(CheckpointError) as failed:
        build(run, *args).fit()
    partial = re.escape(str(ckpts / "step_4.partial"))
    assert re.fullmatch(rf"cannot write checkpoint {partial}: No space left on device[^\n]*; "
                        r"latest still names step_2", str(failed.value)), failed.value
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]
    assert (ckpts / "latest").read_text() == "step_2\n"
    monkeypatch.undo()

    # as many intra-op threads as this process (the reference's): a CPU reduction's order, and
    # so its last bits, depend on them
    proc = run_train(["train.global_batch_size=4", f"run.dir={run}", *args],
                     env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"resumed from {ckpts / 'step_2'} at step 2\n" in proc.stderr, proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
        proc.stderr.splitlines()[-1]], proc.stderr
    assert re.fullmatch(rf"error: not saving step_4: not enough free space for a checkpoint in "
                        rf"{re.escape(str(ckpts))}: [\d.]+ MiB free, the last checkpoint "
                        r"\(step_2\) took [\d.]+ MiB; free space or lower checkpoint.keep_last",
                        proc.stderr.splitlines()[-1]), proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_2"]
    assert (ckpts / "latest").read_text() == "step_2\n"
    assert losses(run) == {s: v for s, v in losses(reference).items() if s <= 4}
