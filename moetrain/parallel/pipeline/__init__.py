"""Pipeline parallelism: `split` (which layers each stage holds; torch-free), `stages` (this
rank's stage modules), `schedule` (torch.distributed.pipelining stages and schedules around them).
docs/pipeline_parallel.md has the design. Nothing is imported here, so the planner can use
`split` without torch."""
