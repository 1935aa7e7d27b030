"""Expert parallelism in the real Trainer against one process: EP over DP, folded over TP and
CP, and expert tensor parallelism (K=3 steps, fp32, dropless, micro-batch LBL; docs/equivalence.md).

The experts are sliced over EP (and their hidden width over ETP) and kept as DTensors on the
MoE mesh; tokens travel by all-to-all. Rank 0's logged loss, grad norm (the expert shards'
squares summed over ep x etp once), aux and z losses and load CV must equal the single-process
run's to rel. 1e-5 and the expert token counts exactly. Layouts of one world size share a launch.
"""

from __future__ import annotations

import pytest

from tests.distributed.equivalence import Layout, check_case, layouts_fixture

FOUR_RANKS = {
    # EP folded over TP (sequence parallelism: the TP ranks route different tokens); the EDP
    # group equals the dense DP group, so the experts stay in their block's FSDP unit.
    "tp2-ep2": Layout(("parallel.tp=2", "parallel.ep=2")),
    # EP folded over CP (the CP ranks hold different chunks of the same sequences).
    "cp2-ep2": Layout(("parallel.cp=2", "parallel.ep=2")),
    # ETP: each expert's hidden width split over two DP ranks (dp4: one sequence per rank).
    "ep2-etp2": Layout(("parallel.ep=2", "parallel.etp=2"), "b4-mb1"),
    # EP over TP x CP: every rank of the model-parallel group holds its own two experts.
    "tp2-cp2-ep4": Layout(("parallel.tp=2", "parallel.cp=2", "parallel.ep=4")),
}
# dp8: one sequence per rank and micro-batch; ep8 holds one expert per rank (edp = 1).
EIGHT_RANKS = {
    f"ep{ep}": Layout((f"parallel.ep={ep}",), "b8-mb1") for ep in (2, 4, 8)
}


four_ranks = layouts_fixture(4, FOUR_RANKS)


eight_ranks = layouts_fixture(8, EIGHT_RANKS)


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_rank_expert_parallel_layout_equals_one_process(name, four_ranks, references):
    check_case(four_ranks, name, FOUR_RANKS[name], references)


@pytest.mark.parametrize("name", EIGHT_RANKS)
def test_expert_parallel_over_eight_data_parallel_ranks_equals_one_process(
        name, eight_ranks, references):
    check_case(eight_ranks, name, EIGHT_RANKS[name], references)
