#!/usr/bin/env python
"""Print what a checkpoint holds: step, layout, model tensors and file sizes.

    python scripts/inspect_checkpoint.py RUN_DIR/checkpoints/step_N [--json]
    python scripts/inspect_checkpoint.py RUN_DIR            (its checkpoints/latest)

Every file is verified against the checkpoint's checksums first (and the summary says so).

Trust: a checkpoint is code (DCP's .metadata and non-tensor entries are pickles, and
unpickling runs what they say): only load checkpoints from a source you trust. Every
file is checked against checksums.json before anything is unpickled; that catches
damage, not tampering (docs/faults.md).
"""

import argparse
import json
import sys
from pathlib import Path

from moetrain.checkpoint import CheckpointError, CheckpointManager
from moetrain.checkpoint.convert import inspect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a step_N directory, a checkpoints/ folder or a run directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        path = CheckpointManager(args.path, None).resolve(str(args.path))
        info = inspect(path)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint   {info['path']}")
    print(f"step         {info['step']}   consumed tokens {info['consumed_tokens']}")
    print(f"saved by     {info['world_size']} rank(s), parallel {info['parallel']}")
    print(f"model numel  {info['model_numel']:,}   MoE layers {info['moe_layers']}, "
          f"experts per layer {info['experts_per_layer']}")
    print(f"files        {len(info['files'])}, {info['total_bytes'] / 2**20:.1f} MiB, "
          f"checksums verified ({info['checksums']})")
    width = max(len(k) for k in info["tensors"])
    for name, t in info["tensors"].items():
        print(f"  {name:<{width}}  {str(t['shape']):<18} {t['dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
