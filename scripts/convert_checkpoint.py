#!/usr/bin/env python
"""Convert a sharded checkpoint to one consolidated file, or to a flat safetensors copy (Hugging
Face-style tensor names, not a model folder transformers loads: `python -m moetrain.hf export`).

    python scripts/convert_checkpoint.py CKPT --to torch OUT.pt          # {name: tensor}, moetrain names
    python scripts/convert_checkpoint.py CKPT --to safetensors OUT_DIR    # model.safetensors + moetrain.json
    python scripts/convert_checkpoint.py OUT_DIR --from-safetensors --to torch OUT.pt   # and back

CKPT may be a step_N directory, a checkpoints/ folder or a run directory (its latest checkpoint).
Only model weights are converted (no optimizer state). See moetrain/checkpoint/convert.py for
the name mapping; every expert of every layer is written as its own tensor.

Trust: a checkpoint is code (DCP's .metadata and non-tensor entries are pickles, and
unpickling runs what they say): only load checkpoints from a source you trust. Every
file is checked against checksums.json before anything is unpickled; that catches
damage, not tampering (docs/faults.md).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from moetrain.checkpoint import CheckpointError, CheckpointManager
from moetrain.checkpoint.convert import from_hf, inspect, load_model_state, save_safetensors, to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("--to", choices=("torch", "safetensors"), required=True)
    parser.add_argument("out", type=Path)
    parser.add_argument("--from-safetensors", action="store_true",
                        help="the source is a folder written by --to safetensors")
    args = parser.parse_args(argv)
    try:
        if args.from_safetensors:
            state = from_hf(load_file(str(args.source / "model.safetensors")))
            info = json.loads((args.source / "moetrain.json").read_text())
        else:
            path = CheckpointManager(args.source, None).resolve(str(args.source))
            state = load_model_state(path)
            info = {k: v for k, v in inspect(path).items() if k not in ("tensors", "files")}
        written = write(state, info, args.to, args.out)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = sum(t.numel() for t in written.values())
    print(f"wrote {args.out} ({len(written)} tensors, {params:,} parameters)")
    return 0


def write(state, info, fmt: str, out: Path) -> dict[str, torch.Tensor]:
    """Write `state` in format `fmt`; returns the tensors as written (names and count differ in
    the Hugging Face layout, where every expert is its own tensor)."""
    if fmt == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(out)  # never leave a half-written file under the final name
        return state
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(state)
    tmp = out / "model.safetensors.tmp"
    save_safetensors(hf, tmp)
    tmp.replace(out / "model.safetensors")
    (out / "moetrain.json").write_text(json.dumps(info, indent=2))
    return hf


if __name__ == "__main__":
    sys.exit(main())
