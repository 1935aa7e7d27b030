"""Prepare the data of a config ahead of training: tokenizer, token shards and index.

Takes the same config overrides as training (so it prepares exactly what training looks for),
plus a few shorthands:

    python scripts/prepare_data.py --corpus data/corpus --out /tmp/prepared --vocab-size 8192
    python scripts/prepare_data.py --out /data/prepared/mix model.vocab_size=32000 \\
        data.tokenizer.path=/models/tok/tokenizer.model \\
        'data.sources=[{path: "/data/web/*.jsonl.zst", weight: 0.7}, {path: /data/code, weight: 0.3}]'

Point training at the result with the same data.* and `data.prepared_dir=DIR`. Running it
again tokenises only what changed (nothing: "up to date"); --force rebuilds from scratch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from moetrain.config import ConfigError, compose, to_object, validate  # noqa: E402
from moetrain.data import DataError, load_index, prepare_data  # noqa: E402
from moetrain.data.prepare import DEFAULT_SHARD_TOKENS  # noqa: E402

FIX = "pass --force to replace it, or choose another --out"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="a text file or folder of .txt files (= data.corpus=...)")
    ap.add_argument("--out", help="the prepared directory (= data.prepared_dir=...)")
    ap.add_argument("--vocab-size", type=int, help="= model.vocab_size=... (the BPE trained, when "
                                                   "data.tokenizer.path is not set)")
    ap.add_argument("--val-fraction", type=float, help="= data.val_fraction=...")
    ap.add_argument("--workers", type=int, help="tokenising processes (= data.num_workers=...)")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    ap.add_argument("--force", action="store_true", help="rebuild the prepared directory from scratch")
    ap.add_argument("overrides", nargs="*", help="config overrides, as for training (key=value)")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("corpus", "data.corpus"), ("out", "data.prepared_dir"), ("vocab_size", "model.vocab_size"),
                      ("val_fraction", "data.val_fraction"), ("workers", "data.num_workers")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        try:
            cfg = to_object(compose(overrides))
        except Exception as e:  # Hydra's composition errors: a bad override
            raise ConfigError(f"{e}{': ' + str(e.__cause__) if e.__cause__ else ''}") from None
        validate(cfg)
        target, built = prepare_data(cfg.data, cfg.model.vocab_size, overwrite=args.force,
                                     shard_tokens=args.shard_tokens, fix=FIX)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = load_index(target)
    for name, s in index["sources"].items():
        splits = s["splits"]
        print(f"  {name}: {s['num_documents']} documents, {splits['train']['tokens']} train + "
              f"{splits['val']['tokens']} val tokens{' (tokenised now)' if name in built else ''}")
    state = f"prepared in {time.perf_counter() - t0:.1f} s" if built else "up to date"
    print(f"{target}: {state} ({index['tokenizer']['kind']} tokenizer, {index['tokenizer']['vocab_size']} "
          f"tokens, {index['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
