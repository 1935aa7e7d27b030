"""Checkpoints of FP8 runs hold plain high-precision tensors (docs/fp8.md, "Checkpoints"):

    tensorwise fsdp2 (FSDP2's float8 all-gather: the weights are torchao subclasses while it
    trains) -> step_2 -> resumed on one process, tensorwise: step 3 equals the uninterrupted run
                       -> resumed on one process without FP8 (fp32): loads bit for bit, trains
                          -> its step_3 -> resumed with MXFP8: loads bit for bit, trains
    MXFP8 ep2, a Mixtral-family model -> step_2 -> python -m moetrain.hf export: transformers
                       loads it and computes moetrain's logits (rel. 1e-5)

and the FP8 checkpoints have the keys, shapes and dtypes (fp32) of a run without FP8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from tests.fp8 import require_torchao

require_torchao()

from moetrain.checkpoint.convert import load_model_state  # noqa: E402
from moetrain.model import Transformer  # noqa: E402
from moetrain.runtime import init_runtime  # noqa: E402
from moetrain.trainer import Trainer  # noqa: E402
from tests.distributed.equivalence import (  # noqa: E402
    B4, KEYS, RTOL, _records, layout_config, rel_err, run_layouts,
)
from tests.harness import run_distributed  # noqa: E402

RUN = [*B4, "checkpoint.every=2"]
MIXTRAL = ["model.family=mixtral", "model.moe.first_dense_layers=0", "model.n_layers=2"]
SAVING = {
    "tw-fsdp2": [*RUN, "train.fp8=tensorwise"],
    "mx-ep2-mixtral": [*RUN, "train.max_steps=2", "train.fp8=mxfp8", "parallel.ep=2", *MIXTRAL],
}


def _step(tmp: Path, run: str, step: int) -> Path:
    return tmp / run / "checkpoints" / f"step_{step}"


def _resume_jobs(tmp: Path) -> list[tuple[str, list[str], Path]]:
    """(name, overrides, checkpoint it resumes), in order: each may resume the one before."""
    saved = _step(tmp / "two", "w2-tw-fsdp2", 2)
    return [
        ("tw-to-1", [*B4, "train.fp8=tensorwise"], saved),
        ("tw-to-none", [*B4, "checkpoint.every=1"], saved),
        ("none-to-mx", [*B4, "train.max_steps=4", "train.fp8=mxfp8"],
         _step(tmp / "one", "tw-to-none", 3)),
    ]


def _resume(rank, world_size, jobs):
    """Each job: build the Trainer (it resumes), compare the loaded model with the checkpoint's
    tensors, train on; returns per job (max |loaded - saved|, metrics records)."""
    torch.set_num_threads(1)
    out = {}
    for name, cfg, run_dir, checkpoint in jobs:
        trainer = Trainer(cfg, init_runtime(cfg), run_dir)
        saved = load_model_state(checkpoint)
        loaded = {k: v.detach() for k, v in trainer.model.state_dict().items()}
        assert loaded.keys() == saved.keys(), name
        worst = max(float((loaded[k] - saved[k]).abs().max()) for k in saved)
        trainer.fit()
        out[name] = worst
        del trainer
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8_checkpoints")
    records = run_layouts(2, SAVING, tmp / "two", timeout=600).records
    jobs = []
    for name, overrides, checkpoint in _resume_jobs(tmp):
        cfg = layout_config(1, [*overrides, f"checkpoint.resume={checkpoint}"])
        run_dir = tmp / "one" / name
        run_dir.mkdir(parents=True)
        jobs.append((name, cfg, run_dir, checkpoint))
    loaded = run_distributed(_resume, 1, jobs, timeout=600)[0]
    for name, _, run_dir, _ in jobs:
        records[name] = _records(run_dir)
    return tmp, records, loaded


def test_fp8_checkpoints_hold_what_a_run_without_fp8_holds(runs):
    """Same keys and shapes as the model's own state dict (and its AdamW states), all fp32."""
    tmp, _, _ = runs
    for run, overrides in (("w2-tw-fsdp2", SAVING["tw-fsdp2"]),
                           ("w2-mx-ep2-mixtral", SAVING["mx-ep2-mixtral"])):
        meta = dcp.FileSystemReader(str(_step(tmp / "two", run, 2))).read_metadata()
        tensors = {k: m for k, m in meta.state_dict_metadata.items()
                   if hasattr(m, "properties") and k.startswith(("model.", "optim.state."))}
        with torch.device("meta"):
            model = Transformer(layout_config(2, overrides).model)
        want = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(m.size) for k, m in tensors.items() if k.startswith("model.")} == want
        assert {m.properties.dtype for m in tensors.values()} == {torch.float32}
        exp_avg = {k for k in tensors if k.endswith(".exp_avg")}
        assert exp_avg == {f"optim.state.{n}.exp_avg" for n, _ in model.named_parameters()}


def test_fp8_checkpoint_resumes_on_another_layout(runs):
    """fsdp2 -> one process, same recipe: step 3 equals the uninterrupted run's (tensorwise
    fsdp2 equals one process bit for bit, docs/fp8.md)."""
    _, records, loaded = runs
    assert loaded["tw-to-1"] == 0.0
    got, want = records["tw-to-1"], records["tw-fsdp2"][2:]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3]
    for key in KEYS:
        assert rel_err(got[0][key], want[0][key]) < RTOL, key
    assert got[0]["tokens_per_expert"] == want[0]["tokens_per_expert"]


def test_fp8_and_high_precision_checkpoints_load_into_each_other(runs):
    """fp8 -> fp32 and fp32 -> MXFP8: every tensor loads bit for bit and training goes on from
    the saved step; the first step after the switch differs from the FP8 run's by FP8's
    rounding only."""
    _, records, loaded = runs
    assert loaded["tw-to-none"] == 0.0 and loaded["none-to-mx"] == 0.0
    assert [r["step"] for r in records["tw-to-none"]] == [3]
    assert [r["step"] for r in records["none-to-mx"]] == [4]
    fp8_step3 = records["tw-fsdp2"][2]["loss"]
    assert 0 < rel_err(records["tw-to-none"][0]["loss"], fp8_step3) < 1e-3
    assert records["none-to-mx"][0]["loss"] < records["tw-fsdp2"][0]["loss"]


def test_fp8_run_exports_to_hugging_face(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from moetrain.hf.export import export

    tmp, _, _ = runs
    run_dir = tmp / "two" / "w2-mx-ep2-mixtral"
    cfg = layout_config(2, SAVING["mx-ep2-mixtral"])
    # as moetrain.train writes it: the export reads the run's model config from it
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    export(run_dir, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    model = Transformer(cfg.model).eval()
    model.load_state_dict(load_model_state(_step(tmp / "two", "w2-mx-ep2-mixtral", 2)))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
        err = float((hf(tokens).logits - want).abs().max() / want.abs().max())
    assert err < 1e-5
