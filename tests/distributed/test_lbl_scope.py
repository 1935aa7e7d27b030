"""`model.moe.lbl.scope`: micro, seq and global on the same data, each against one process (dp2, cp2).

What "layout-invariant" means for each scope (moe/losses.py, docs/load_balancing.md):

- micro: f and p over one micro-batch. A layout that keeps the micro-batch (micro_batch_size
  sequences; split over CP x TP or not) gives the same loss and gradient: dp2 with micro-batches
  of 2 equals one process with micro-batches of 2.
- seq: f and p per sequence, averaged over the micro-batch's sequences: the ranks splitting a
  sequence (CP x TP) sum their counts, DP ranks hold other sequences and sum nothing, so dp2
  with micro-batches of 2 equals one process with micro-batches of 2.
- global: micro-batch m's f counts the tokens of micro-steps 1..m of *every* DP rank, so the
  gradient depends on the micro-step: the dp * micro_batch_size sequences the DP ranks process
  together. A layout equals one process whose micro-batches are those micro-steps: dp2 with one
  micro-batch of 2 per rank equals one process with one micro-batch of 4; CP (and TP, EP, PP)
  keep the micro-steps, so cp2 equals one process with the same micro-batches. dp2 with two
  micro-batches of 1 per rank has micro-steps {0, 2} and {1, 3} of the step's sequences, which
  no single-process micro-batching has (its micro-batches are contiguous): only the logged
  values of the first step, which do not depend on the micro-steps, are equal.
- the logged global aux_loss is the LBL of the whole step (f and p over all its tokens), so at
  a given set of weights it does not depend on the layout or the micro-batching at all.
"""

from __future__ import annotations

import math

import pytest

from tests.distributed.equivalence import KEYS, RTOL, Layout, check_case, layouts_fixture, rel_err

GLOBAL = "model.moe.lbl.scope=global"
TWO_RANKS = {
    "dp2-micro": Layout(()),  # one micro-batch of 2 per rank
    # one micro-batch of 2 per rank: one micro-step of 4 sequences
    "dp2-global": Layout(("train.micro_batch_size=2", GLOBAL), "b4-mb4-global"),
    "cp2-global": Layout(("parallel.cp=2", GLOBAL), "b4-global"),
    "dp2-global-2mb": Layout(("train.micro_batch_size=1", GLOBAL), "b4-global"),
    # seq: each sequence's own counts; DP ranks hold other sequences, nothing to sum over them
    "dp2-seq": Layout(("model.moe.lbl.scope=seq",), "b4-seq"),
}


two_ranks = layouts_fixture(2, TWO_RANKS)


@pytest.mark.parametrize("name", ["dp2-micro", "dp2-global", "cp2-global", "dp2-seq"])
def test_scope_is_layout_invariant_where_the_micro_steps_are(name, two_ranks, references):
    check_case(two_ranks, name, TWO_RANKS[name], references)


def test_global_and_micro_scopes_give_different_aux_losses(two_ranks):
    micro, glob = two_ranks.records["dp2-micro"][0], two_ranks.records["dp2-global"][0]
    for rec in (micro, glob):
        assert all(math.isfinite(rec[k]) for k in KEYS) and rec["aux_loss"] > 0
    assert rel_err(glob["aux_loss"], micro["aux_loss"]) > 1e-3  # same data, other loss
    # the aux losses do not enter the forward: the first step's LM loss is the same
    assert rel_err(glob["loss"], micro["loss"]) < RTOL


def test_global_scope_logs_the_whole_step_whatever_the_micro_steps(two_ranks, references):
    """First step (same weights everywhere): the logged values are functions of the step's
    tokens only; the gradient, which used each micro-step's running counts, is not."""
    mb4 = references.records["b4-mb4-global"][0]
    mb2 = references.records["b4-global"][0]
    interleaved = two_ranks.records["dp2-global-2mb"][0]
    for key in ("loss", "aux_loss", "z_loss", "load_cv"):
        for rec in (mb2, interleaved):
            assert rel_err(rec[key], mb4[key]) < RTOL, key
    print("step-1 grad norm, global scope: one micro-batch of 4 "
          f"{mb4['grad_norm']:.7g}, two of 2 {mb2['grad_norm']:.7g}, dp2 x two of 1 "
          f"{interleaved['grad_norm']:.7g}")
    assert rel_err(mb2["grad_norm"], mb4["grad_norm"]) > RTOL
