"""The training loop in-process (one rank): non-finite steps, evaluation."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError
from moetrain.model.moe import MoELayer
from moetrain.trainer import TrainingError
from tests.harness import build_trainer


def build(tmp_path, *overrides):
    return build_trainer(tmp_path, ["train.global_batch_size=4", f"run.dir={tmp_path}", *overrides])


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
    recs = strict_records(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert [r["bad_steps_total"] for r in recs] == [0, 1, 1]
    # strict JSON: the NaNs are nulls, named in the record's `nonfinite`
    assert recs[1]["loss"] is None and {"loss", "lm_loss", "total_loss"} <= set(recs[1]["nonfinite"])
    assert "nonfinite" not in recs[0] and math.isfinite(recs[2]["loss"])
    strict_records(tmp_path / "routing.jsonl")


def strict_records(path):
    """The records of a JSONL file read by a strict parser (RFC 8259: no NaN / Infinity)."""
    def refuse(name):
        raise ValueError(f"{path.name}: {name} is not JSON")
    return [json.loads(x, parse_constant=refuse) for x in path.read_text().splitlines()]


def test_too_many_bad_steps_in_a_row_abort_with_a_clear_message(tmp_path):
    trainer = build(tmp_path, "train.max_steps=10", "train.max_bad_steps=3", "train.eval_every=0",
                    "train.log_every=3")
    poison(trainer, {2, 3, 4, 5})
    with pytest.raises(TrainingError, match="3 steps in a row.*train.max_bad_steps=3"):
        trainer.fit()
    assert trainer.state.step == 4
    # the failing step's record is written before the run stops, off the logging interval too
    recs = strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [3, 4] and recs[-1]["skipped"]


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
    resumed = build(tmp_path, "train.max_steps=3", "train.eval_every=0", "checkpoint.resume=auto",
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
    reference = dropless.evaluate()["val_loss"]
    assert dropping.evaluate()["val_loss"] == pytest.approx(reference, rel=1e-9, abs=0)
    assert {m.capacity_factor for m in dropping.model.modules() if isinstance(m, MoELayer)} == {0.5}
    # The same weights evaluated with the training capacity: dropping tokens shows in the loss
    # (fresh weights: the experts' outputs are small, so by ~1e-3 nats; the same evaluation
    # agrees to ~1e-9).
    at_capacity = build(tmp_path / "c", *common, "model.moe.capacity_factor=0.5",
                        "train.eval_capacity_factor=0.5")
    assert abs(at_capacity.evaluate()["val_loss"] - reference) > 1e-4


def test_a_validation_split_too_small_to_evaluate_is_refused_before_training(tmp_path):
    # The split sizes are known once the data is prepared: refused then, not at the first
    # evaluation after steps whose work would be lost.
    with pytest.raises(ConfigError, match=r"^train\.eval_every=20: no source's validation split "
                       r"gives one global batch of train\.global_batch_size=4 .*corpus \(0\)"
                       r".*train\.eval_every=0"):
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
    # every optional key too: val_loss (evaluation), max_attn_logit (QK-clip), the multi-token
    # prediction's keys (documented as "only with MTP")
    trainer = build(tmp_path, "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1",
                    "optim=muon", "optim.qk_clip_threshold=100", "model.mtp.depth=2")
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {re.sub(r"/\d+$", "/<k>", re.sub(r"^(source_tokens|val_loss)/.+$", r"\1/<name>", k))
              for r in recs for k in r}
    # `nonfinite` only in a record with a NaN (test_a_nan_step_is_skipped_counted_and_training_goes_on);
    # the ep_* keys only with model.moe.ep_budget (tests/distributed/test_equivalence_ep.py)
    assert logged == _documented_metrics_keys() - {"nonfinite", "ep_budget", "ep_need",
                                                   "ep_overflows", "ep_wasted_rows"}
    assert {"mtp_loss/1", "mtp_loss/2", "val_mtp_loss/2"} <= set(recs[-1])


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "corpus"


def test_a_mixture_logs_each_sources_validation_loss_and_the_mfu(tmp_path, capfd):
    """val_loss/<source> equals a plain forward over that source's first validation batch,
    val_loss is their mixture-weighted mean; MFU is the planner's FLOPs over the named peak, on
    the console too."""
    from moetrain.config.schema import DataConfig
    from moetrain.data import PackedTokenDataset, ensure_prepared
    from moetrain.data.index import tokenizer_source
    from moetrain.planning import flops_per_token

    spm = tokenizer_source(ensure_prepared(DataConfig(), 8192))  # the shipped corpus's BPE
    sources = (f"data.sources=[{{path: '{SHIPPED}/hamlet.txt', weight: 3}}, "
               f"{{path: '{SHIPPED}/macbeth.txt', weight: 1}}]")
    trainer = build(tmp_path, "train.max_steps=1", "train.eval_every=1", "train.eval_batches=1",
                    "train.dtype=fp32", "logging.progress=true", "data.val_fraction=0.1", sources,
                    f"data.tokenizer.path={spm}")
    trainer.fit()
    (rec,) = strict_records(tmp_path / "metrics.jsonl")
    model = trainer.model.eval()
    for name in ("hamlet", "macbeth"):  # the reference: the model's forward, F.cross_entropy
        tokens = PackedTokenDataset(trainer.prepared_dir, "val", 128, name).get_batch(range(4))
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        want = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        assert rec[f"val_loss/{name}"] == pytest.approx(want, rel=1e-6), name
    assert rec["val_loss"] == pytest.approx(
        (3 * rec["val_loss/hamlet"] + rec["val_loss/macbeth"]) / 4, rel=1e-12)
    per_token = flops_per_token(trainer.cfg.model, 128, top_k=2).train
    assert rec["model_tflops"] == pytest.approx(per_token * rec["tokens_per_s"] / 1e12, rel=1e-9)
    assert rec["mfu"] == pytest.approx(rec["model_tflops"] / rec["peak_tflops"], rel=1e-12)
    assert "fp32 matmul ceiling" in rec["peak_name"] and 0 < rec["mfu"] < 1.5
    assert f"| MFU {100 * rec['mfu']:.2f}% (" in capfd.readouterr().out


def test_the_batch_any_step_trained_is_what_moetrain_batches_shows(tmp_path):
    """`python -m moetrain.batches`: the ids of each step's global batch as trained, step 3's
    from the sampler state of the step-2 checkpoint."""
    from moetrain.batches import batches

    trainer = build(tmp_path, "train.max_steps=3", "train.eval_every=0", "checkpoint.every=2",
                    "data.seq_len=32")
    trained = []
    draw = trainer.sampler.next_step

    def spy():
        micro_batches = draw()
        trained.append(trainer.train_data.get_batch([i for mb in micro_batches for i in mb]))
        return micro_batches

    trainer.sampler.next_step = spy
    trainer.fit()
    assert (tmp_path / "checkpoints" / "step_2").is_dir()
    for step in (1, 2, 3):
        rows = list(batches(trainer.cfg, tmp_path, step, val=False))
        assert [r["ids"] for r in rows] == trained[step - 1].tolist(), step
        assert {r["source"] for r in rows} == {"corpus"} and rows[0]["text"]


def test_train_seed_sets_the_initial_weights(tmp_path):
    """The same train.seed gives the same initial weights, another seed other weights."""
    first = [build(tmp_path / n, f"train.seed={s}").model.state_dict()
             for n, s in (("a", 1), ("b", 1), ("c", 2))]
    names = [n for n, t in first[0].items() if t.is_floating_point() and t.ndim >= 2]
    assert names and all(torch.equal(first[0][n], first[1][n]) for n in names)
    assert not any(torch.equal(first[0][n], first[2][n]) for n in names)
