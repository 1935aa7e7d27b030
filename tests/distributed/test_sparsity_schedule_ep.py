"""Progressive sparsification under expert parallelism: dense -> sparse on ep2 follows the
schedule and still equals one process."""

import json

from tests.distributed.equivalence import compare, run_layouts

# top_k from all 8 experts (dense, DS-MoE) down to 2 over the 3 steps: 8, 5, 2.
SCHEDULE = ["model.moe.schedule.top_k.kind=linear", "model.moe.schedule.top_k.start=8",
            "model.moe.schedule.top_k.end=2", "model.moe.schedule.top_k.end_step=2",
            "train.global_batch_size=4"]


def logged(run_dir, key):
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dense_to_sparse_schedule_under_ep2(tmp_path):
    ep2 = run_layouts(2, {"ep2": [*SCHEDULE, "parallel.ep=2"]}, tmp_path)
    single = run_layouts(1, {"single": SCHEDULE}, tmp_path)
    run_dir = tmp_path / "w2-ep2"
    assert logged(run_dir, "top_k") == [8, 5, 2]
    assert logged(run_dir, "experts_per_token") == [8.0, 5.0, 2.0]
    routing = [json.loads(x) for x in (run_dir / "routing.jsonl").read_text().splitlines()]
    assert sum(routing[0]["layers"][0]["tokens_per_expert"]) == 4 * 128 * 8  # dense first step
    compare(ep2.records["ep2"], single.records["single"])
