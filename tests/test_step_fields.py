"""The step's one reduction as described (moetrain/step_fields.py) is what the trainer packs:
a real step with MTP, MoE statistics and QK-clip packs exactly the described fields, counted
here by hand, and a field the description lacks stops the step naming it."""

from __future__ import annotations

import pytest

from moetrain.step_fields import check_step_fields, field_width, step_fields
from tests.harness import build_trainer, tiny_config


def test_a_real_step_packs_exactly_the_described_fields(tmp_path):
    trainer = build_trainer(tmp_path, ["train.global_batch_size=4", f"run.dir={tmp_path}",
                                       "model.mtp.depth=2", "model.mtp.block=moe", "optim=muon",
                                       "optim.qk_clip_threshold=100"])
    packed = {}
    reduce_step = trainer.runner.reduce_step

    def spy(*args, **kwargs):
        summed = reduce_step(*args, **kwargs)
        packed.update(summed.packed.shapes)
        return summed

    trainer.runner.reduce_step = spy
    trainer.train_step(trainer.sampler.next_step())
    # tiny: 4 layers (3 MoE) + 2 MoE MTP blocks, 8 heads, 8 experts; one rank
    assert packed == {"lm_sum": (), "lm_targets": (), "mtp_sum": (2,), "mtp_targets": (2,),
                      "grad_sq": (), "stop": (), "moe": (5, 7 + 2 * 8), "memory_peak": (1,),
                      "head_max": (1, 6, 8)}
    assert field_width(packed) == 4 + 2 * 2 + 1 + 5 * 23 + 6 * 8


def test_a_packed_field_the_description_lacks_is_named():
    described = {"lm_sum": (), "moe": (3, 23)}
    check_step_fields(dict(described), described)
    with pytest.raises(RuntimeError, match=r"ep_need: packed \(2,\), described None"):
        check_step_fields({**described, "ep_need": (2,)}, described)
    with pytest.raises(RuntimeError, match=r"moe: packed \(4, 23\), described \(3, 23\)"):
        check_step_fields({**described, "moe": (4, 23)}, described)


def test_the_description_follows_the_sync_free_budget(tmp_path):
    cfg = tiny_config(["parallel.ep=2", "model.moe.ep_budget=1.5"], world_size=4)
    fields = step_fields(cfg, 4)
    assert {k: fields[k] for k in ("ep_overflow", "ep_rows", "ep_slots", "ep_need")} == {
        "ep_overflow": (), "ep_rows": (), "ep_slots": (), "ep_need": (4,)}
