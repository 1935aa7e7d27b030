"""The training loop in-process (one rank): non-finite steps, evaluation."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.model.moe import MoELayer
from moetrain.runtime import init_runtime
from moetrain.trainer import Trainer, TrainingError


def build(tmp_path, *overrides):
    cfg = to_object(compose(["+experiment=tiny", "train.global_batch_size=4", "train.micro_batch_size=2",
                             "logging.progress=false", "checkpoint.every=0", f"run.dir={tmp_path}",
                             *overrides]))
    validate(cfg)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, init_runtime(cfg), tmp_path)


def poison(trainer, steps):
    """Make the model's logits NaN during the given (1-based) optimizer steps."""
    forward = trainer.model.forward

    def maybe_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        return out * math.nan if trainer.state.step + 1 in steps else out

    trainer.model.forward = maybe_nan


def test_a_nan_step_is_skipped_counted_and_training_goes_on(tmp_path):
    trainer = build(tmp_path, "train.max_steps=3", "train.eval_every=0")
    poison(trainer, {2})
    before = {}
    step = trainer.train_step

    def spy(batches):  # snapshot the parameters around the poisoned step
        if trainer.state.step == 1:
            before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        record, routing = step(batches)
        if trainer.state.step == 1:
            assert record["skipped"]
            for n, p in trainer.model.named_parameters():
                assert torch.equal(p, before[n]), n
        return record, routing

    trainer.train_step = spy
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert [r["bad_steps_total"] for r in recs] == [0, 1, 1]
    assert math.isnan(recs[1]["loss"]) and math.isfinite(recs[2]["loss"])


def test_too_many_bad_steps_in_a_row_abort_with_a_clear_message(tmp_path):
    trainer = build(tmp_path, "train.max_steps=10", "train.max_bad_steps=3", "train.eval_every=0")
    poison(trainer, {2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 steps in a row.*train.max_bad_steps=3"):
        trainer.fit()
    assert trainer.state.step == 4


def test_evaluation_logs_a_validation_loss(tmp_path):
    trainer = build(tmp_path, "train.max_steps=2", "train.eval_every=2", "train.eval_batches=2")
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" not in recs[0] and 5 < recs[1]["val_loss"] < 10


def test_dense_to_sparse_schedule_is_followed_and_logged(tmp_path):
    trainer = build(tmp_path, "train.max_steps=6", "train.eval_every=0",
                    "model.moe.schedule.top_k.kind=linear", "model.moe.schedule.top_k.start=8",
                    "model.moe.schedule.top_k.end=2", "model.moe.schedule.top_k.end_step=4")
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["top_k"] for r in recs] == [8, 7, 5, 4, 2, 2]
    assert [r["experts_per_token"] for r in recs] == [8.0, 7.0, 5.0, 4.0, 2.0, 2.0]
    routing = [json.loads(x) for x in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert sum(routing[0]["layers"][0]["tokens_per_expert"]) == 4 * 128 * 8  # dense: every expert


def test_aux_loss_free_bias_moves_and_is_checkpointed(tmp_path):
    trainer = build(tmp_path, "train.max_steps=3", "train.eval_every=0", "checkpoint.every=3",
                    "model.moe.routing.bias_rate=0.001", "model.moe.lbl.coeff=0")
    trainer.fit()
    bias = trainer.model.layers["1"].moe.router.expert_bias
    steps_moved = bias.abs() / 0.001  # three updates of +-0.001 each: |bias| in {1, 3} x 0.001
    assert bias.abs().sum() > 0
    torch.testing.assert_close(steps_moved, steps_moved.round())
    assert set(steps_moved.round().tolist()) <= {1.0, 3.0}
    resumed = build(tmp_path, "train.max_steps=3", "train.eval_every=0",
                    "model.moe.routing.bias_rate=0.001", "model.moe.lbl.coeff=0")
    assert torch.equal(resumed.model.layers["1"].moe.router.expert_bias, bias)


def test_upcycling_starts_the_moe_run_from_a_dense_run(tmp_path):
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    dense = build(dense_dir, "train.max_steps=2", "train.eval_every=0", "checkpoint.every=2",
                  "model.moe.first_dense_layers=4", "model.ffn_hidden=192")
    dense.fit()
    moe = build(moe_dir, "train.max_steps=1", "train.eval_every=0",
                f"model.init.upcycle_from={dense_dir}", "model.ffn_hidden=192",
                "model.moe.lbl.coeff=0", "model.moe.z_loss_coeff=0")
    tokens = torch.randint(0, 8192, (2, 16))
    torch.testing.assert_close(moe.model(tokens), dense.model(tokens), rtol=1e-5, atol=1e-5)


def test_evaluation_is_dropless_whatever_the_training_capacity(tmp_path):
    """With token dropping in training, the validation loss is the dropless model's (by default,
    train.eval_capacity_factor=null); the training capacity is back after the evaluation."""
    common = ("train.max_steps=1", "train.eval_every=1", "train.eval_batches=2")
    dropping = build(tmp_path / "a", *common, "model.moe.capacity_factor=0.5")
    dropless = build(tmp_path / "b", *common)
    reference = dropless.evaluate()
    assert dropping.evaluate() == pytest.approx(reference, rel=1e-9, abs=0)
    assert {m.capacity_factor for m in dropping.model.modules() if isinstance(m, MoELayer)} == {0.5}
    # The same weights evaluated with the training capacity: dropping tokens shows in the loss
    # (fresh weights: the experts' outputs are small, so by ~1e-3 nats; the same evaluation
    # agrees to ~1e-9).
    at_capacity = build(tmp_path / "c", *common, "model.moe.capacity_factor=0.5",
                        "train.eval_capacity_factor=0.5")
    assert abs(at_capacity.evaluate() - reference) > 1e-4


def test_a_validation_split_too_small_to_evaluate_is_refused_before_training(tmp_path):
    # The split sizes are known once the data is prepared: refused then, not at the first
    # evaluation after steps whose work would be lost.
    with pytest.raises(ConfigError, match=r"^train\.eval_every=20: the validation split gives 0 "
                       r"evaluation sequences .*train\.global_batch_size=4\).*train\.eval_every=0"):
        build(tmp_path / "a", "data.val_fraction=0", "train.eval_every=20")
    trainer = build(tmp_path / "b", "data.val_fraction=0", "train.eval_every=0")
    assert trainer.val_data is None


def _documented_metrics_keys() -> set[str]:
    """The keys of docs/design.md's metrics.jsonl table (first column, backticked)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    table = text.split("**metrics.jsonl.**", 1)[1].split("\n\n", 2)[1]
    return {key for row in table.splitlines()[2:]
            for key in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_metrics_records_have_exactly_the_keys_the_design_documents(tmp_path):
    # every optional key too: val_loss (evaluation), max_attn_logit (QK-clip)
    trainer = build(tmp_path, "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1",
                    "optim=muon", "optim.qk_clip_threshold=100")
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {re.sub(r"^source_tokens/.+$", "source_tokens/<name>", k) for r in recs for k in r}
    assert logged == _documented_metrics_keys()
