"""What a checkpoint was trained as: an architecture or tokenizer other than the run's is refused
on resume even where every shape agrees; what may change is returned (and logged)."""

import json

import pytest

from moetrain.checkpoint import CheckpointError
from moetrain.checkpoint.identity import check_resume, checkpoint_identity, is_architecture
from moetrain.config import compose, to_object

# OLMoE's way of being the tiny model: q/k norms over the whole projection, top-k weights not
# renormalised. Every tensor of the plain tiny model exists in it with the same shape.
OLMOE_STYLE = ["model.family=olmoe", "model.qk_norm=full", "model.moe.norm_topk_prob=false",
               "model.moe.first_dense_layers=0"]


def _prepared(path, sha="a" * 64, eos=2):
    path.mkdir(parents=True, exist_ok=True)
    (path / "index.json").write_text(json.dumps({"format_version": 2, "tokenizer": {
        "file": "tokenizer.model", "kind": "sentencepiece", "vocab_size": 8192, "eos_id": eos,
        "bos_id": 1, "sha256": sha, "source": None}}))
    return path


def _checkpoint(tmp_path, overrides, prepared):
    ckpt = tmp_path / "step_2"
    ckpt.mkdir()
    cfg = to_object(compose(["+experiment=tiny", *overrides]))
    # as the trainer writes it (CheckpointManager: json.dumps of the meta it is given)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "identity": checkpoint_identity(cfg, prepared)}))
    return ckpt


def test_which_keys_are_the_architecture():
    for key in ("model.family", "model.qk_norm", "model.moe.norm_topk_prob", "model.d_model",
                "model.moe.score_func", "model.moe.routing.group_mode", "model.rope_theta",
                "model.mla.kv_lora_rank", "model.moe.routing.num_null_experts",
                "model.mtp.depth", "model.mtp.block"):
        assert is_architecture(key), key
    for key in ("model.moe.top_k", "model.moe.capacity_factor", "model.moe.schedule.top_k.kind",
                "model.moe.lbl.coeff", "model.moe.routing.bias_rate", "model.init.from_hf",
                "model.init_std", "model.moe.kernels", "optim.lr", "parallel.tp", "data.sources",
                "model.mtp.loss_scale", "model.mtp.loss_scale_schedule.end",
                "model.moe.ep_budget", "model.moe.ep_overlap"):
        assert not is_architecture(key), key


def test_another_family_with_equal_shapes_is_refused_naming_every_key(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    ckpt = _checkpoint(tmp_path, OLMOE_STYLE, prepared)
    tiny = to_object(compose(["+experiment=tiny", "model.moe.first_dense_layers=0"]))
    with pytest.raises(CheckpointError) as err:
        check_resume(ckpt, tiny, prepared)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {ckpt} was trained as another model than this run's: ")
    assert "model.family is 'olmoe' there, 'custom' here" in msg
    assert "model.qk_norm is 'full' there, 'none' here" in msg
    assert "model.moe.norm_topk_prob is false there, true here" in msg
    assert "first_dense_layers" not in msg and "\n" not in msg


def test_what_may_change_is_returned_and_another_tokenizer_is_refused(tmp_path):
    prepared = _prepared(tmp_path / "prepared")
    ckpt = _checkpoint(tmp_path, [], prepared)
    resumed = to_object(compose(["+experiment=tiny", "optim.lr=0.001", "train.max_steps=100",
                                 "parallel.tp=2", "model.moe.top_k=1", "train.global_batch_size=32",
                                 "checkpoint.resume=/elsewhere", "model.mtp.loss_scale=0.1",
                                 "model.moe.ep_overlap=true"]))
    changes = check_resume(ckpt, resumed, prepared)
    trained_lr = to_object(compose(["+experiment=tiny"])).optim.lr
    assert f"optim.lr: {trained_lr} -> 0.001" in changes and "parallel.tp: 1 -> 2" in changes
    assert "model.moe.top_k: 2 -> 1" in changes and "train.global_batch_size: 16 -> 32" in changes
    # DeepSeek-V3 lowers the MTP weight late in training; the overlapped exchange is the same math
    assert "model.mtp.loss_scale: 0.3 -> 0.1" in changes
    assert "model.moe.ep_overlap: false -> true" in changes
    assert not any(c.startswith("checkpoint.resume") for c in changes)
    assert check_resume(ckpt, to_object(compose(["+experiment=tiny"])), prepared) == []
    other = _prepared(tmp_path / "other", sha="b" * 64)
    with pytest.raises(CheckpointError, match=r"its tokenizer is tokenizer.model \(sentencepiece, "
                       r"8192 tokens, EOS id 2, sha256 aaaaaaaaaaaa\), the run's data uses "
                       r".*sha256 bbbbbbbbbbbb"):
        check_resume(ckpt, resumed, other)


def test_a_checkpoint_without_identity_is_resumed_with_a_warning(tmp_path, caplog):
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text(json.dumps({"step": 1}))
    assert check_resume(ckpt, to_object(compose(["+experiment=tiny"])), _prepared(tmp_path / "p")) == []
    assert "records no architecture" in caplog.text
