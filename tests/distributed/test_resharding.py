"""Checkpoints reshard: a run saved at one layout resumes at another and continues with the
same losses as the uninterrupted run (real Trainer, forked gloo ranks, fp32, DCP).

Three runs of K=4 steps save at step 2 (and 4): ep2, dp2 and pp2 (1f1b) on 2 ranks. The
step-2 checkpoints are resumed at other layouts - ep2 on one process, at tp2 and at etp2 (the
experts' hidden width split instead of the experts); dp2 at tp2; pp2 on one process - and
steps 3-4 must equal the saving run's (rel. 1e-5; expert token counts exactly): model and
AdamW state, sampler position and step all carried over. This works because every parameter
has its full-model name and global shape in the checkpoint: expert shards are DTensors on the
MoE mesh, TP and FSDP shards DTensors, and a pipeline rank saves its stages under the full
model's names (`RankModel`). With optim=muon the momentum buffers are DTensors like the weights:
an ep2 Muon run resumes on one process and at tp2 x etp2 (whole experts become column shards).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from tests.distributed.equivalence import B4, KEYS, MUON, RTOL, rel_err, run_layouts

STEPS, SAVED = 4, 2
RUN = [*B4, f"train.max_steps={STEPS}"]
SAVING = {  # name -> layout; each saves at step 2 (and 4)
    "ep2": ["parallel.ep=2"],
    "dp2": [],
    "pp2": ["parallel.pp=2"],
    # Muon's momentum buffers (DTensors like the weights) and QK-clip
    "ep2-muon": ["parallel.ep=2", *MUON],
}
# resumed run -> (world size, saving run, layout)
RESUMES = {
    "ep2-to-1": (1, "ep2", []),
    "ep2-to-tp2": (2, "ep2", ["parallel.tp=2"]),
    "ep2-to-etp2": (2, "ep2", ["parallel.etp=2"]),
    "dp2-to-tp2": (2, "dp2", ["parallel.tp=2"]),
    "pp2-to-1": (1, "pp2", []),
    "ep2-muon-to-1": (1, "ep2-muon", list(MUON)),
    "ep2-muon-to-tp2-etp2": (2, "ep2-muon", ["parallel.tp=2", "parallel.etp=2", *MUON]),
}


def _checkpoint(tmp: Path, saving: str) -> Path:
    return tmp / "two" / f"w2-{saving}" / "checkpoints" / f"step_{SAVED}"


def dct_metadata(tmp: Path, saving: str) -> dict:
    return dcp.FileSystemReader(str(_checkpoint(tmp, saving))).read_metadata().state_dict_metadata


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resharding")
    two = {name: [*RUN, *layout, "checkpoint.every=2"] for name, layout in SAVING.items()}
    one = {}
    for name, (world, saving, layout) in RESUMES.items():
        # the checkpoint exists by the time the job starts: the saving runs go first
        resume = [*RUN, *layout, f"checkpoint.resume={_checkpoint(tmp, saving)}"]
        (two if world == 2 else one)[name] = resume
    records = run_layouts(2, two, tmp / "two").records
    records.update(run_layouts(1, one, tmp / "one").records)
    return tmp, records


@pytest.mark.parametrize("name", RESUMES)
def test_resumed_at_another_layout_continues_like_the_uninterrupted_run(name, runs):
    _, records = runs
    saving = RESUMES[name][1]
    want = records[saving][SAVED:]
    got = records[name]
    steps = list(range(SAVED + 1, STEPS + 1))
    assert [r["step"] for r in got] == [r["step"] for r in want] == steps
    worst = {}
    for g, w in zip(got, want):
        for key in (*KEYS, *(["max_attn_logit"] if "max_attn_logit" in w else [])):
            worst[key] = max(worst.get(key, 0.0), rel_err(g[key], w[key]))
            assert rel_err(g[key], w[key]) < RTOL, (name, g["step"], key, g[key], w[key])
        assert g["tokens_per_expert"] == w["tokens_per_expert"], (name, g["step"])
    print(f"{name}: max rel. error " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_checkpoints_hold_full_model_tensors(runs):
    """The expert shards of ep2 are saved as one [E, D, F] tensor; pp2's two stages as one
    model's keys (what the resumes above rely on)."""
    tmp, _ = runs
    ep2 = dcp.FileSystemReader(str(_checkpoint(tmp, "ep2"))).read_metadata().state_dict_metadata
    E, D, F = 8, 128, 192  # the tiny model's experts
    assert list(ep2["model.layers.1.moe.experts.w1"].size) == [E, D, F]
    assert list(ep2["model.layers.1.moe.experts.w2"].size) == [E, F, D]
    assert list(ep2["optim.state.layers.1.moe.experts.w1.exp_avg"].size) == [E, D, F]
    muon = dct_metadata(tmp, "ep2-muon")
    assert list(muon["optim.state.layers.1.moe.experts.w1.momentum_buffer"].size) == [E, D, F]
    assert list(muon["optim.state.layers.1.attention.wq.weight.momentum_buffer"].size) == [D, D]
    assert "optim.state.layers.1.moe.experts.w1.exp_avg" not in muon
    assert "optim.state.tok_embeddings.weight.exp_avg" in muon  # AdamW's part
    pp2 = dcp.FileSystemReader(str(_checkpoint(tmp, "pp2"))).read_metadata().state_dict_metadata
    model_keys = {k for k in pp2 if k.startswith("model.")}
    assert model_keys == {k for k in ep2 if k.startswith("model.")}
