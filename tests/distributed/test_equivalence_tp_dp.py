"""Tensor (+ sequence) and data parallelism against one process: the real Trainer, K steps.

Each layout trains the tiny experiment for K=3 optimizer steps on forked gloo ranks (fp32,
deterministic, dropless, micro-batch LBL); rank 0's logged loss, grad norm, aux and z losses and
load CV must equal the single-process run's to rel. 1e-5, the expert token counts exactly
(docs/equivalence.md). The losses alone could not catch a wrong gradient scale (AdamW is
invariant to it), which is what the grad norm is for. Layouts of one world size share a launch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.equivalence import Layout, check_case, layouts_fixture, rel_err
from tests.harness import run_train, torchrun

TWO_RANKS = {
    "dp2": Layout(()),
    "dp2-replicated": Layout(("parallel.fsdp.enabled=false",)),
    "dp2-zero2": Layout(("parallel.fsdp.reshard_after_forward=false",)),
    "tp2": Layout(("parallel.tp=2",)),
    # shared experts, tied embeddings and the global LBL scope under TP
    "tp2-global-shared-tied": Layout(("parallel.tp=2",), "b4-variant"),
}
FOUR_RANKS = {
    "dp4": Layout((), "b4-mb1"),
    "tp2-dp2": Layout(("parallel.tp=2",)),
    "tp2-dp2-replicated": Layout(("parallel.tp=2", "parallel.fsdp.enabled=false")),
    "tp4": Layout(("parallel.tp=4",)),
}


two_ranks = layouts_fixture(2, TWO_RANKS)


four_ranks = layouts_fixture(4, FOUR_RANKS)


def _check(runs, name, case, references):
    check_case(runs, name, case, references)
    _check_samples(runs.samples[name], references.samples[case.reference][0][1])


def _check_samples(per_rank, single_micro_batches):
    """TP ranks of a DP replica get the same micro-batches; the DP ranks' slices, in dp order,
    are the single process's global batch."""
    by_dp: dict[int, list[list[int]]] = {}
    for dp_rank, micro_batches in per_rank:
        assert by_dp.setdefault(dp_rank, micro_batches) == micro_batches, dp_rank
    assert sorted(by_dp) == list(range(len(by_dp)))
    flat = [i for dp in sorted(by_dp) for mb in by_dp[dp] for i in mb]
    assert flat == [i for mb in single_micro_batches for i in mb]


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_rank_layout_equals_one_process(name, two_ranks, references):
    _check(two_ranks, name, TWO_RANKS[name], references)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_layout_equals_one_process(name, four_ranks, references):
    _check(four_ranks, name, FOUR_RANKS[name], references)


def test_reference_is_a_real_run(references):
    recs = references.records["b4"]
    assert len(recs) == 3 and 5 < recs[0]["loss"] < 10
    assert recs[-1]["loss"] < recs[0]["loss"]  # it trains
    assert all(r["aux_loss"] > 0 and r["z_loss"] > 0 and r["grad_norm"] > 0 for r in recs)


# -- the command line under torchrun ---------------------------------------------------------

def _cli(run_dir: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> list[dict]:
    run_train(["train.global_batch_size=4", "train.max_steps=2", f"run.dir={run_dir}",
               *overrides], launcher=launcher, check=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_torchrun_tp2_trains_like_one_process(tmp_path):
    single = _cli(tmp_path / "single")
    tp2 = _cli(tmp_path / "tp2", "parallel.tp=2", launcher=torchrun(2))
    # Written once (by rank 0), one record per step.
    assert [r["step"] for r in tp2] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(tp2, single):
        for key in ("loss", "grad_norm", "aux_loss"):
            assert rel_err(a[key], b[key]) < 1e-5, (a["step"], key, a[key], b[key])
    assert sorted(p.name for p in (tmp_path / "tp2" / "logs").iterdir()) == ["rank0.log", "rank1.log"]
