"""The prepared directory: its layout, and reading its index (docs/data.md documents both).

    index.json              format version, token dtype, the tokenizer, val_fraction, and per
                            source: path, files (name, size, mtime), counts and shards
    tokenizer.model|.json   the tokenizer the tokens were made with (trained here, or a copy)
    <source>-<hash>/        one folder per source: train_00000.bin ..., val_00000.bin ...
                            (raw little-endian token ids, uint16 when the vocabulary fits)

Everything needed to train is in the directory: neither the raw files nor a pass over them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moetrain.data.errors import DataError
from moetrain.data.tokenizer import Tokenizer

FORMAT_VERSION = 2
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
SPLIT_BLOCK = 1024  # granularity (tokens) of the train/val split


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_index(prepared_dir: str | os.PathLike) -> dict:
    """index.json of a prepared directory, without checking the shards."""
    d = Path(prepared_dir)
    try:
        index = json.loads((d / INDEX_FILE).read_text())
    except FileNotFoundError:
        raise DataError(f"{d} is not a prepared dataset (no {INDEX_FILE}); prepare it with "
                        "scripts/prepare_data.py or let data.auto_prepare do it") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{d / INDEX_FILE} is corrupt ({e}); delete {d} and prepare again") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{d / INDEX_FILE} has format_version {index.get('format_version')}, this "
                        f"moetrain reads {FORMAT_VERSION}; delete {d} and prepare again")
    return index


def load_index(prepared_dir: str | os.PathLike) -> dict:
    """Read index.json and check that the tokenizer and every shard have the recorded sizes
    (file sizes only: constant time in the corpus size, whatever the shards hold)."""
    d = Path(prepared_dir)
    index = read_index(d)
    if not (d / index["tokenizer"]["file"]).is_file():
        raise DataError(f"{d}: tokenizer file {index['tokenizer']['file']} is missing; delete {d} and "
                        "prepare again")
    itemsize = np.dtype(index["dtype"]).itemsize
    for source in index["sources"].values():
        for info in source["splits"].values():
            for shard in info["shards"]:
                f = d / source["dir"] / shard["file"]
                want = shard["tokens"] * itemsize
                have = f.stat().st_size if f.is_file() else None
                if have != want:
                    state = "is missing" if have is None else f"has {have} bytes"
                    raise DataError(f"shard {f} {state}, {INDEX_FILE} records {shard['tokens']} tokens "
                                    f"({want} bytes): the prepared data is truncated or corrupt; "
                                    f"delete {d} and prepare again")
    return index


def load_prepared_tokenizer(prepared_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a prepared directory."""
    d = Path(prepared_dir)
    info = read_index(d)["tokenizer"]
    return Tokenizer.load(d / info["file"], info.get("eos_token"), key=f"{d / INDEX_FILE}")


def tokenizer_source(prepared_dir: str | os.PathLike) -> Path:
    """Where a prepared directory's tokenizer came from: the existing tokenizer it was given
    (data.tokenizer.path), if that is still there, else its copy here (or the trained BPE)."""
    d = Path(prepared_dir)
    info = read_index(d)["tokenizer"]
    source = info.get("source")
    return Path(source) if source and Path(source).exists() else d / info["file"]
