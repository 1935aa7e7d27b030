"""Print the rank groups of a parallel layout without starting any process.

    python -m moetrain.layout --world-size 8 parallel.tp=2 parallel.cp=2 parallel.ep=4
    python -m moetrain.layout --world-size 16 parallel.tp=2 parallel.ep=8 --json
    python -m moetrain.layout --world-size 8 parallel.tp=2 model.n_kv_heads=1   # -> error, exit 2

The parallel checks always run. The model checks (experts, heads, layers, sequence length,
batch) run when any model.*, train.* or data.* key is given, against the schema defaults for the
keys not given. An invalid layout prints `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from moetrain.parallel.checks import check_model_fit
from moetrain.parallel.dims import GROUP_KINDS, LayoutError, ParallelDims

PARALLEL_KEYS = ("tp", "cp", "pp", "ep", "etp", "vpp")
# The model, train and data keys that the layout constrains (docs/design.md), all integers.
MODEL_KEYS = (
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.ffn_hidden",
    "model.moe.num_experts",
    "model.moe.expert_hidden",
    "model.moe.first_dense_layers",
    "train.global_batch_size",
    "train.micro_batch_size",
    "data.seq_len",
)
VALID_KEYS = tuple(f"parallel.{k}" for k in PARALLEL_KEYS) + MODEL_KEYS


def parse_overrides(items: Sequence[str]) -> dict[str, int]:
    """Parse `key=value` items into {dotted key: int}; LayoutError on a bad or unknown key."""
    overrides: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep:
            raise LayoutError(f"expected key=value, got {item!r}")
        if key not in VALID_KEYS:
            raise LayoutError(f"unknown key {key!r}; valid keys: {', '.join(VALID_KEYS)}", (key,))
        try:
            overrides[key] = int(value)
        except ValueError:
            raise LayoutError(f"{key} must be an integer, got {value!r}", (key,)) from None
    return overrides


def layout_from_overrides(world_size: int, overrides: dict[str, int]) -> ParallelDims:
    """Validate the layout (and the model fit, when model keys are given); return its dims."""
    parallel = {k: overrides.get(f"parallel.{k}", 1) for k in PARALLEL_KEYS}
    dims = ParallelDims(world_size, **parallel)
    if any(key in overrides for key in MODEL_KEYS):
        # Imported only here: the config package may pull in Hydra, which plain layouts don't need.
        from moetrain.config.schema import DataConfig, ModelConfig, TrainConfig

        model, train, data = ModelConfig(), TrainConfig(), DataConfig()
        sections = {"model": model, "model.moe": model.moe, "train": train, "data": data}
        for key, value in overrides.items():
            section, _, attr = key.rpartition(".")
            if section in sections:
                setattr(sections[section], attr, value)
        check_model_fit(dims, model, train, data.seq_len)
    return dims


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
        epilog="valid keys: " + " ".join(VALID_KEYS),
    )
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks W")
    parser.add_argument("--json", action="store_true", help="print the groups as JSON")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        dims = layout_from_overrides(args.world_size, parse_overrides(args.overrides))
    except LayoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(layout_json(dims)))
    else:
        print(format_table(dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
