"""CheckpointManager on one process: atomic `latest`, pruning, resolution, refusal of bad input."""

import errno
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moetrain.checkpoint import CheckpointError, CheckpointManager, TrainState


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def save(mgr, model, opt, step):
    return mgr.save(model, opt, TrainState(step=step, consumed_tokens=10 * step,
                                           sampler={"epoch": 0, "position": step}), meta={})


def test_save_load_round_trip_restores_model_optimizer_state_and_rng(tmp_path):
    model, opt = make(0)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    torch.manual_seed(7)
    path = save(mgr, model, opt, 3)
    expected_rng_draw = torch.rand(3)
    other, other_opt = make(1)
    torch.manual_seed(99)
    state = mgr.load(mgr.resolve("auto"), other, other_opt)
    assert path.name == "step_3" and state.step == 3 and state.consumed_tokens == 30
    assert state.sampler == {"epoch": 0, "position": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert torch.equal(torch.rand(3), expected_rng_draw)  # the RNG continues as after the save


def test_a_crash_during_save_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    save(mgr, model, opt, 1)

    def crash(*args, storage_writer, **kwargs):
        Path(storage_writer.path).mkdir()
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"half")
        raise OSError(errno.EACCES, "Permission denied", str(storage_writer.path))

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint \S+step_2\.partial: "
                       r"Permission denied \(\S+\); latest still names step_1$"):
        save(mgr, model, opt, 2)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert not (tmp_path / "checkpoints" / "step_2.partial").exists()  # cleaned up
    assert mgr.resolve("auto").name == "step_1"


def test_keep_last_prunes_old_checkpoints_but_never_latest(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        save(mgr, model, opt, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_3", "step_4"]
    # Re-saving an older step (a rerun after resume) makes it latest; it must survive pruning.
    save(mgr, model, opt, 2)
    assert mgr.resolve("auto").name == "step_2"
    assert (tmp_path / "checkpoints" / "step_2" / ".metadata").exists()


def test_keep_last_orders_steps_by_number_across_a_power_of_ten(tmp_path):
    """step_10 is newer than step_9 (by name it sorts first): pruning keeps the newest by step."""
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (8, 9, 10, 11):
        save(mgr, model, opt, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_10", "step_11"]


def test_resolve_accepts_run_dir_checkpoints_dir_and_step_dir(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    step_dir = save(mgr, model, opt, 5)
    fresh = CheckpointManager(tmp_path / "other", keep_last=None)
    assert fresh.resolve("never") is None and fresh.resolve("auto") is None
    assert fresh.resolve(str(tmp_path)) == step_dir
    assert fresh.resolve(str(tmp_path / "checkpoints")) == step_dir
    assert fresh.resolve(str(step_dir)) == step_dir
    with pytest.raises(CheckpointError, match="checkpoint.resume"):
        fresh.resolve(str(tmp_path / "nowhere"))


def test_latest_naming_a_deleted_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    step_dir = save(mgr, model, opt, 1)
    (step_dir / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        mgr.resolve("auto")


def test_missing_shard_and_other_shape_are_refused_with_the_name(tmp_path):
    model, opt = make()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    step_dir = save(mgr, model, opt, 1)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"model\.0\.weight"):
        mgr.load(step_dir, wider, torch.optim.AdamW(wider.parameters()))
    shard = next(step_dir.glob("*.distcp"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        mgr.load(step_dir, model, opt)


def test_a_checkpoint_of_another_optimizer_is_refused_naming_the_state(tmp_path):
    """AdamW's moments saved, Muon's momentum buffers wanted (and the reverse): one line naming
    the missing optimizer state, not DCP's cross-rank exception."""
    from moetrain.optim.muon import Muon

    model, opt = make()
    mgr = CheckpointManager(tmp_path / "adamw", keep_last=None)
    step_dir = save(mgr, model, opt, 1)
    muon = Muon([("0.weight", model[0].weight)],
                [{"params": [model[0].bias, *model[1].parameters()]}], lr=0.1, weight_decay=0.0)
    with pytest.raises(CheckpointError, match=r"no optimizer group 0 entry 'algorithm': it was "
                                              r"saved with another optimizer"):
        mgr.load(step_dir, model, muon)
    for p in model.parameters():  # no gradients: the state is made first (DCP's lr-0 step)
        p.grad = None
    with pytest.raises(CheckpointError, match=r"no optimizer state 0\.weight\.momentum_buffer"):
        mgr.load(step_dir, model, Muon([("0.weight", model[0].weight)],
                                       [{"params": [model[0].bias, *model[1].parameters()]}],
                                       lr=0.1, weight_decay=0.0))
    muon_dir = save(CheckpointManager(tmp_path / "muon", keep_last=None), model, muon, 1)
    with pytest.raises(CheckpointError, match=r"no optimizer state 0\.weight\.(step|exp_avg)"):
        mgr.load(muon_dir, model, torch.optim.AdamW(model.parameters(), lr=0.1))
