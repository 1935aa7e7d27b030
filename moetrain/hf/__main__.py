"""python -m moetrain.hf export RUN_OR_CHECKPOINT OUT_DIR | overrides HF_DIR (docs/families.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moetrain.checkpoint import CheckpointError
from moetrain.config.families import FAMILIES

TRUST = """Trust: a checkpoint is code (DCP's .metadata and non-tensor entries are pickles, and
unpickling runs what they say): only load checkpoints from a source you trust. Every
file is checked against checksums.json before anything is unpickled; that catches
damage, not tampering (docs/faults.md)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetrain.hf", description=__doc__,
                                     epilog=TRUST, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a Hugging Face folder from a moetrain checkpoint",
                        description="Write a Hugging Face folder from a moetrain checkpoint.",
                        epilog=TRUST, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("source", type=Path, help="a run directory, checkpoints/ folder or step_<N>")
    ex.add_argument("out", type=Path, help="the Hugging Face folder to write (new or empty)")
    ex.add_argument("--family", choices=FAMILIES, help="overrides model.family of the run")
    ex.add_argument("--tokenizer", type=Path,
                    help="sentencepiece .model, tokenizer.json or HF folder (default: the run's)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ex.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")
    ov = sub.add_parser("overrides", help="print the model.* overrides of a Hugging Face config")
    ov.add_argument("hf_dir", type=Path)
    args = parser.parse_args(argv)

    from moetrain.hf.config import HFConfigError
    try:
        if args.command == "overrides":
            from moetrain.hf.config import folder_overrides, format_overrides

            print(format_overrides(folder_overrides(args.hf_dir)))
            return 0
        from moetrain.hf.export import export, parse_size

        result = export(args.source, args.out, family=args.family, tokenizer=args.tokenizer,
                        dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size))
    except (HFConfigError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.out} ({result.family}: {result.tensors} tensors, "
          f"{result.parameters:,} values in {len(result.files)} safetensors files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
