"""Prepare a corpus for training: train the tokenizer, tokenize, write packed token shards.

    python scripts/prepare_data.py --corpus data/corpus --out data/cache/shakespeare-8k --vocab-size 8192

Point training at the result with `data.prepared_dir=DIR` (and the same `model.vocab_size`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from moetrain.data.prepare import DEFAULT_SHARD_TOKENS, DataError, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a text file or a folder of .txt files")
    ap.add_argument("--out", required=True, help="the prepared directory to create")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    ap.add_argument("--force", action="store_true", help="replace an existing prepared directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        index = prepare_dataset(args.corpus, args.out, args.vocab_size, args.val_fraction, args.shard_tokens,
                        overwrite=args.force)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    splits = index["splits"]
    print(f"{args.out}: {splits['train']['tokens']} train + {splits['val']['tokens']} val tokens "
          f"({index['dtype']}, {index['num_documents']} documents) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
