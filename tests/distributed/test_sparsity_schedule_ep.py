"""Progressive sparsification under expert parallelism: dense -> sparse on ep2 follows the
schedule and still equals one process."""

import json

from tests.distributed.equivalence import Layout, check_case, layouts_fixture

CASES = {"ep2": Layout(("parallel.ep=2",), "b4-top-k-schedule")}


two_ranks = layouts_fixture(2, CASES)


def test_dense_to_sparse_schedule_under_ep2(two_ranks, references):
    check_case(two_ranks, "ep2", CASES["ep2"], references)
    run_dir = two_ranks.run_dirs["ep2"]
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["top_k"] for r in logged] == [8, 5, 2]
    assert [r["experts_per_token"] for r in logged] == [8.0, 5.0, 2.0]
    routing = [json.loads(x) for x in (run_dir / "routing.jsonl").read_text().splitlines()]
    assert sum(routing[0]["layers"][0]["tokens_per_expert"]) == 4 * 128 * 8  # dense first step
