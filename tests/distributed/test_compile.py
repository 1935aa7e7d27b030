"""train.compile=true (regional torch.compile of every block) trains like eager: the real
Trainer on one process and on tp2 x ep2 (EP folded over TP: DTensor TP and the all-to-all
inside compiled blocks) equals the eager single-process run to rel. 1e-5 (2-layer model: one
dense and one MoE block, to keep compile time in CI small)."""

from __future__ import annotations

from tests.distributed.equivalence import Layout, check_case, layouts_fixture

COMPILE = ("train.compile=true",)
ONE_RANK = {"compiled": Layout(COMPILE, "b4-l2")}
TWO_RANKS = {"tp2-ep2-compiled": Layout(("parallel.tp=2", "parallel.ep=2", *COMPILE), "b4-l2")}


one_rank = layouts_fixture(1, ONE_RANK)


two_ranks = layouts_fixture(2, TWO_RANKS)


def test_compiled_one_process_equals_eager(one_rank, references):
    check_case(one_rank, "compiled", ONE_RANK["compiled"], references)


def test_compiled_tp2_ep2_equals_eager_one_process(two_ranks, references):
    check_case(two_ranks, "tp2-ep2-compiled", TWO_RANKS["tp2-ep2-compiled"], references)
