"""Print the rank groups of a parallel layout without starting any process.

    python -m moetrain.layout --world-size 8 parallel.tp=2 parallel.cp=2 parallel.ep=4
    python -m moetrain.layout --world-size 64 +experiment=mixtral_8x7b parallel.tp=2 parallel.ep=8 parallel.pp=4
    python -m moetrain.layout --world-size 16 parallel.tp=2 parallel.ep=8 --json
    python -m moetrain.layout --world-size 8 parallel.tp=2 model.n_kv_heads=1   # -> error, exit 2

The overrides are Hydra's and compose the config exactly as `moetrain.train` does (the defaults
of configs/, `+experiment=NAME`, any key); the layout is checked against that config: the
degrees against the world size, and the model and batch shapes they must divide. An invalid
layout or a bad key prints `error: ...` (one line naming the key) on stderr and exits with
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from moetrain.parallel import check_layout
from moetrain.parallel.dims import GROUP_KINDS, LayoutError, ParallelDims


def layout_of(world_size: int, overrides: Sequence[str]) -> ParallelDims:
    """The checked layout of the config the trainer would compose from `overrides`.

    Raises ConfigError (a bad key or value) or LayoutError (a layout that cannot run)."""
    # Imported here: Hydra is only needed once the tool runs.
    from moetrain.config import compose, to_object

    return check_layout(to_object(compose(list(overrides))), world_size)


def format_table(dims: ParallelDims) -> str:
    """A readable listing of every group kind and of each rank's coordinates in both views."""
    lines = [f"layout: {dims}", ""]
    groups = dims.groups()
    width = max(len(kind) for kind in GROUP_KINDS)
    lines.append("groups (size x count):")
    for kind in GROUP_KINDS:
        kind_groups = groups[kind]
        head = f"  {kind:<{width}}  {len(kind_groups[0])} x {len(kind_groups)}: "
        lines.append(head + " ".join(_ranks(g) for g in kind_groups))
    lines += ["", "ranks:"]
    rank_w = max(4, len(str(dims.world_size - 1)))
    header = f"  {'rank':>{rank_w}}  | {'pp':>3} {'dp':>3} {'cp':>3} {'tp':>3} |"
    header += f" {'pp':>3} {'edp':>3} {'ep':>3} {'etp':>3}"
    lines.append(header)
    for rank in range(dims.world_size):
        d, m = dims.dense_coord(rank), dims.moe_coord(rank)
        lines.append(
            f"  {rank:>{rank_w}}  | {d.pp:>3} {d.dp:>3} {d.cp:>3} {d.tp:>3} |"
            f" {m.pp:>3} {m.edp:>3} {m.ep:>3} {m.etp:>3}"
        )
    return "\n".join(lines)


def _ranks(group: list[int]) -> str:
    return "[" + ",".join(str(r) for r in group) + "]"


def layout_json(dims: ParallelDims) -> dict[str, Any]:
    """{tp, cp, dp, pp, dp_cp, ep, etp, edp} -> list of rank lists."""
    return dims.groups()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.layout",
        description="Print the rank groups of a parallel layout (no processes are started).",
    )
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks W")
    parser.add_argument("--json", action="store_true", help="print the groups as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. +experiment=mixtral_8x7b parallel.tp=2")
    args = parser.parse_intermixed_args(argv)
    from moetrain.config import ConfigError

    try:
        dims = layout_of(args.world_size, args.overrides)
    except (ConfigError, LayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(layout_json(dims)))
    else:
        print(format_table(dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
