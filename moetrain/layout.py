"""Print the rank groups of a parallel layout without starting any process.

    python -m moetrain.layout --world-size 8 parallel.tp=2 parallel.cp=2 parallel.ep=4
    python -m moetrain.layout --world-size 64 +experiment=mixtral_8x7b parallel.tp=2 parallel.ep=8 parallel.pp=4
    python -m moetrain.layout --world-size 16 parallel.tp=2 parallel.ep=8 --json
    python -m moetrain.layout --world-size 8 parallel.tp=2 model.n_kv_heads=1   # -> error, exit 2
    python -m moetrain.layout --world-size 32 --gpus-per-node 8 parallel.tp=4 parallel.ep=16

The overrides are Hydra's and compose the config exactly as `moetrain.train` does (the defaults
of configs/, `+experiment=NAME`, any key); the layout is checked against that config: the
degrees against the world size, and the model and batch shapes they must divide. An invalid
layout or a bad key prints `error: ...` (one line naming the key) on stderr and exits with
status 2. Ranks fill nodes in order, `--gpus-per-node` at a time (8 by default, or the `--gpu`'s:
72 for a GB200 NVL72 rack): the table shows each rank's node and which groups cross nodes, whose
collectives then run at the network's bandwidth instead of NVLink's.
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


def format_table(dims: ParallelDims, gpus_per_node: int = 8) -> str:
    """A readable listing of every group kind (and whether its groups cross nodes of
    `gpus_per_node` GPUs) and of each rank's coordinates in both views and its node."""
    nodes = -(-dims.world_size // gpus_per_node)
    lines = [f"layout: {dims}",
             f"nodes: {nodes} of {gpus_per_node} GPUs (ranks fill nodes in order)", ""]
    groups = dims.groups()
    width = max(len(kind) for kind in GROUP_KINDS)
    lines.append("groups (size x count):")
    for kind in GROUP_KINDS:
        kind_groups = groups[kind]
        head = f"  {kind:<{width}}  {len(kind_groups[0])} x {len(kind_groups)}: "
        lines.append(head + " ".join(_ranks(g) for g in kind_groups)
                     + "   " + _node_span(kind_groups, gpus_per_node))
    lines += ["", "ranks:"]
    rank_w = max(4, len(str(dims.world_size - 1)))
    header = f"  {'rank':>{rank_w}}  | {'pp':>3} {'dp':>3} {'cp':>3} {'tp':>3} |"
    header += f" {'pp':>3} {'edp':>3} {'ep':>3} {'etp':>3} | {'node':>4}"
    lines.append(header)
    for rank in range(dims.world_size):
        d, m = dims.dense_coord(rank), dims.moe_coord(rank)
        lines.append(
            f"  {rank:>{rank_w}}  | {d.pp:>3} {d.dp:>3} {d.cp:>3} {d.tp:>3} |"
            f" {m.pp:>3} {m.edp:>3} {m.ep:>3} {m.etp:>3} | {rank // gpus_per_node:>4}"
        )
    return "\n".join(lines)


def _node_span(groups: list[list[int]], gpus_per_node: int) -> str:
    """"within a node" or how many of the groups cross nodes, and over how many."""
    spans = [len({r // gpus_per_node for r in g}) for g in groups]
    crossing = sum(1 for s in spans if s > 1)
    if crossing == 0:
        return "(within a node)"
    return f"(crosses nodes: {crossing} of {len(groups)} groups, up to {max(spans)} nodes each)"


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
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node (default 8, or the --gpu's)")
    parser.add_argument("--gpu", default=None,
                        help="h100 | h200 | b200 | gb200: take its GPUs per node")
    parser.add_argument("--json", action="store_true", help="print the groups as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides, e.g. +experiment=mixtral_8x7b parallel.tp=2")
    args = parser.parse_intermixed_args(argv)
    from moetrain.config import ConfigError
    from moetrain.hardware import HardwareError, check_gpus_per_node, hardware

    try:
        gpus_per_node = 8
        if args.gpu is not None:
            gpus_per_node = hardware(args.gpu).gpus_per_node
        if args.gpus_per_node is not None:
            check_gpus_per_node(args.gpus_per_node)
            gpus_per_node = args.gpus_per_node
        dims = layout_of(args.world_size, args.overrides)
    except (ConfigError, LayoutError, HardwareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(layout_json(dims)))
    else:
        print(format_table(dims, gpus_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
