"""Size a config before running it: parameters, FLOPs per token, sparsity and memory per rank.

    python -m moetrain.plan +experiment=mixtral_8x7b
    python -m moetrain.plan +experiment=qwen3_30b_a3b parallel.ep=8 parallel.tp=2 --world-size 64
    python -m moetrain.plan +experiment=olmoe_1b_7b --json

Overrides are Hydra's, as for `moetrain.train`. The world size defaults to the smallest one the
layout allows (lcm of tp*cp*pp and etp*ep*pp). An invalid config or layout prints `error: ...`
(naming the key) on stderr and exits with status 2. Formulas: moetrain/planning.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.plan",
        description="Parameters, FLOPs per token and memory per rank of a config (nothing runs).",
    )
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of ranks W (default: the smallest the layout allows)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. +experiment=mixtral_8x7b parallel.ep=8")
    args = parser.parse_intermixed_args(argv)

    from moetrain.config import ConfigError, LoggingConfig, compose, to_object, validate
    from moetrain.parallel import LayoutError, check_layout
    from moetrain.planning import format_plan, make_plan, min_world_size

    try:
        cfg = to_object(compose(list(args.overrides)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world_size = args.world_size or min_world_size(cfg.parallel)
    try:
        # Logging checks whether wandb/tensorboard are installed here, which a plan made on a
        # laptop for a GPU cluster must not depend on: validate everything else.
        validate(dataclasses.replace(cfg, logging=LoggingConfig()))
        dims = check_layout(cfg, world_size)
    except (LayoutError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, dims)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
