"""Context and pipeline parallelism in the real Trainer against one process, and the 5-D
layout pp2 x tp2 x cp2 x ep2 (K=3 steps, fp32, dropless, micro-batch LBL; docs/equivalence.md).

CP: both ways of seeing the other ranks' keys and values (`parallel.cp_comm`), inputs, targets
and positions zig-zag sharded by the context. PP: every schedule the trainer offers with one
stage per rank, interleaved with two virtual stages per rank, and zero bubble (its split
backward) with FSDP over dp2; the loss comes from the last
stage, the routing statistics from every stage, the grad norm is summed over the stages.
The layouts compared with the "b4" run also evaluate after the last step (`eval_sums`: the
CP-local targets counted, the last stage's loss); one moves aux-loss-free expert biases (each
stage updates its own layers from the global load).
Rank 0's logged values must equal the single-process run's to rel. 1e-5 (docs/equivalence.md).
Pipelined expert parallelism with the overlapped exchange (1F1B and interleaved) and with a
sync-free budget that overflows (each step redone through the pipeline schedule) is bitwise
the plain exchange (`SAME_AS`).
"""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import (
    BIAS, Layout, assert_bitwise_equal, check_case, layouts_fixture,
)

PP2 = ("parallel.pp=2",)
INTERLEAVED = ("parallel.vpp=2", "parallel.pp_schedule=interleaved")
TWO_RANKS = {
    "cp2": Layout(("parallel.cp=2",)),
    "cp2-ring": Layout(("parallel.cp=2", "parallel.cp_comm=ring")),
    "pp2-1f1b": Layout(PP2),
    "pp2-interleaved": Layout((*PP2, *INTERLEAVED)),  # 4 virtual stages of one layer
    "pp2-gpipe": Layout((*PP2, "parallel.pp_schedule=gpipe")),
    # parallel.pp_layers: stage 0 holds only the dense first layer (no MoE layer on rank 0)
    "pp2-uneven": Layout((*PP2, "parallel.pp_layers=[1,3]")),
}
PP4 = ("parallel.pp=4",)  # 1f1b needs 4 micro-batches: 4 of one sequence
FOUR_RANKS = {
    "cp4": Layout(("parallel.cp=4",)),
    "cp4-ring": Layout(("parallel.cp=4", "parallel.cp_comm=ring")),
    "pp4-1f1b-bias": Layout((*PP4, *BIAS), "b4-mb1-bias"),  # one MoE layer per stage
    "pp4-interleaved": Layout((*PP4, *INTERLEAVED), "b4-mb1-l8"),  # 8 stages: 8 layers
    "pp4-gpipe": Layout((*PP4, "parallel.pp_schedule=gpipe"), "b4-mb1"),
    "pp2-ep2": Layout(("parallel.pp=2", "parallel.ep=2"), "b4-mb1"),  # dp2, EP over DP
    "pp2-ep2-overlap": Layout(("parallel.pp=2", "parallel.ep=2", "model.moe.ep_overlap=true"),
                              "b4-mb1"),
    "pp2-ep2-overflow": Layout(("parallel.pp=2", "parallel.ep=2", "model.moe.ep_budget=0.5"),
                               "b4-mb1"),
    # 4 virtual stages of one layer each, two per rank
    "pp2-interleaved-ep2": Layout(("parallel.pp=2", "parallel.ep=2", *INTERLEAVED), "b4-mb1"),
    "pp2-interleaved-ep2-overlap": Layout(("parallel.pp=2", "parallel.ep=2", *INTERLEAVED,
                                           "model.moe.ep_overlap=true"), "b4-mb1"),
    # zero bubble (input- and weight-gradient steps) with FSDP over dp2: 4 virtual stages
    "pp2-zero_bubble-dp2": Layout((*PP2, "parallel.vpp=2", "parallel.pp_schedule=zero_bubble"),
                                  "b4-mb1"),
    # replicated DP under the pipeline: each stage's gradients summed over its dp2 replicas
    "pp2-dp2-replicated": Layout(("parallel.pp=2", "parallel.fsdp.enabled=false"), "b4-mb1"),
}
SAME_AS = {"pp2-ep2-overlap": "pp2-ep2", "pp2-ep2-overflow": "pp2-ep2",
           "pp2-interleaved-ep2-overlap": "pp2-interleaved-ep2"}
# Every dimension at once: dp1, EP folded over the TP x CP ranks of each stage (edp 2).
EIGHT_RANKS = {
    "pp2-tp2-cp2-ep2": Layout(("parallel.pp=2", "parallel.tp=2", "parallel.cp=2",
                               "parallel.ep=2")),
}


two_ranks = layouts_fixture(2, TWO_RANKS)


four_ranks = layouts_fixture(4, FOUR_RANKS)


eight_ranks = layouts_fixture(8, EIGHT_RANKS)


@pytest.mark.parametrize("name", TWO_RANKS)
def test_two_rank_layout_equals_one_process(name, two_ranks, references):
    check_case(two_ranks, name, TWO_RANKS[name], references)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_layout_equals_one_process(name, four_ranks, references):
    check_case(four_ranks, name, FOUR_RANKS[name], references)


@pytest.mark.parametrize("name", SAME_AS)
def test_pipelined_overlapped_and_redone_exchanges_are_bitwise_the_plain_one(name, four_ranks):
    assert_bitwise_equal(four_ranks, name, SAME_AS[name])
    if name.endswith("-overflow"):  # the redo ran through the pipeline schedule
        assert four_ranks.records[name][0]["ep_overflows"] >= 1


def test_five_dimensional_layout_equals_one_process(eight_ranks, references):
    name = "pp2-tp2-cp2-ep2"
    check_case(eight_ranks, name, EIGHT_RANKS[name], references)
