"""Corpus -> tokenizer + packed token shards, prepared once and shared by every rank.

Layout of a prepared directory::

    index.json          format version, dtype, vocab size, per-split shards and token counts,
                        tokenizer file name, corpus fingerprint
    tokenizer.model     sentencepiece BPE model trained on the corpus
    train_00000.bin ... raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    val_00000.bin ...

Every corpus file is one document; an EOS token follows each document, and the documents are
concatenated into one stream in sorted file order. The stream does not depend on seq_len:
sequences are cut when the data is loaded (`PackedTokenDataset`). The validation split is
`val_fraction` of the stream, taken as blocks of SPLIT_BLOCK tokens spread evenly over the stream
(so that it samples every work, not only the last file).

A directory becomes visible only complete: it is built in a temporary sibling and renamed into
place with `os.replace`; concurrent callers of `ensure_prepared` serialise on a `flock` lock file
next to the target, so one process prepares and the others wait and then load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moetrain.data.tokenizer import HF_TOKENIZER_FILE, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB per uint16 shard
SPLIT_BLOCK = 1024  # granularity (tokens) of the train/val split
_REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(RuntimeError):
    """The data cannot be found, prepared or loaded; the message names the config key and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def default_cache_root() -> Path:
    env = os.environ.get("MOETRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moetrain"


def resolve_corpus_path(corpus: str | os.PathLike) -> Path:
    # The schema default "${moetrain_root:}/data/corpus" is normally resolved by the config layer;
    # resolve it here too so a plain DataConfig() works.
    return Path(str(corpus).replace("${moetrain_root:}", str(_REPO_ROOT))).expanduser()


def corpus_files(corpus: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(root, sorted .txt files) of a corpus given as one text file or a folder of .txt files."""
    path = resolve_corpus_path(corpus)
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise DataError(f"data.corpus={str(corpus)!r}: no such file or folder; point data.corpus at a "
                        "text file or a folder of .txt files")
    files = sorted(p for p in path.rglob("*.txt")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files or all(p.stat().st_size == 0 for p in files):
        raise DataError(f"data.corpus={str(corpus)!r}: the folder has no non-empty .txt files")
    return path, files


def corpus_fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 over the files' names (relative to the corpus root) and contents."""
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix().encode()
        h.update(len(name).to_bytes(8, "little") + name)
        h.update(f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- validation

def load_index(prepared_dir: str | os.PathLike) -> dict:
    """Read index.json and check that the tokenizer and every shard have the recorded sizes."""
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
    if not (d / index["tokenizer"]).is_file():
        raise DataError(f"{d}: tokenizer file {index['tokenizer']} is missing; delete {d} and prepare again")
    itemsize = np.dtype(index["dtype"]).itemsize
    for split, info in index["splits"].items():
        for shard in info["shards"]:
            f = d / shard["file"]
            want = shard["tokens"] * itemsize
            have = f.stat().st_size if f.is_file() else None
            if have != want:
                state = "is missing" if have is None else f"has {have} bytes"
                raise DataError(f"shard {f} {state}, {INDEX_FILE} records {shard['tokens']} tokens "
                                f"({want} bytes): the prepared data is truncated or corrupt; "
                                f"delete {d} and prepare again")
    return index


# ----------------------------------------------------------------------------- building

class _ShardWriter:
    """Appends tokens to <split>_NNNNN.bin files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            k = min(tokens.size, self.shard_tokens - self.shards[-1]["tokens"])
            self._fh.write(tokens[:k].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += k
            tokens = tokens[k:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._fh = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def info(self) -> dict:
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _is_val_block(b: int, n_blocks: int, n_val: int) -> bool:
    # Bresenham spreading: exactly n_val of the n_blocks blocks, evenly spaced.
    return (b + 1) * n_val // n_blocks > b * n_val // n_blocks


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    # Never touch the network, and keep the console clean.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _build(root: Path, files: list[Path], out: Path, vocab_size: int, val_fraction: float,
           shard_tokens: int, fingerprint: str, hf_tokenizer: Path | None = None) -> dict:
    """Write tokenizer, shards and index.json into the (empty, private) directory `out`;
    `hf_tokenizer` (a Hugging Face folder) is copied and used instead of training one."""
    with _quiet_datasets() as datasets:
        # The HF cache lives inside the private build dir, so nothing is written under ~.
        cache = out / ".hf_cache"
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document",
                                   split="train", cache_dir=str(cache))
        # sentencepiece trains on lines; a document's lines in order, documents in file order.
        if hf_tokenizer is not None:
            tok = _copy_hf_tokenizer(hf_tokenizer, out, vocab_size)
        else:
            lines = (line for batch in ds.iter(batch_size=16) for doc in batch["text"]
                     for line in doc.split("\n"))
            tok = Tokenizer.train(lines, out / TOKENIZER_FILE, vocab_size)
            if tok.vocab_size != vocab_size:
                raise DataError(f"the tokenizer has {tok.vocab_size} pieces, not model.vocab_size={vocab_size}")
        eos = tok.eos_id

        def encode(batch: dict) -> dict:
            ids = tok.encode_batch(batch["text"])
            return {"ids": ids, "n": [len(x) + 1 for x in ids]}

        ds = ds.map(encode, batched=True, batch_size=16, num_proc=1, remove_columns=["text"],
                    new_fingerprint=f"{fingerprint[:32]}-{vocab_size}")
        total = int(sum(ds["n"]))

        n_blocks = -(-total // SPLIT_BLOCK)
        n_val = 0 if val_fraction <= 0 else max(1, round(n_blocks * val_fraction))
        if n_val >= n_blocks:
            raise DataError(f"data.val_fraction={val_fraction} leaves no training tokens "
                            f"({total} tokens in all)")
        dtype = token_dtype(vocab_size)
        writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
        pos = 0
        for batch in ds.iter(batch_size=64):
            for ids in batch["ids"]:
                doc = np.asarray(ids + [eos], dtype=np.int64)
                while doc.size:
                    block = pos // SPLIT_BLOCK
                    k = min(doc.size, (block + 1) * SPLIT_BLOCK - pos)
                    split = "val" if _is_val_block(block, n_blocks, n_val) else "train"
                    writers[split].write(doc[:k])
                    doc, pos = doc[k:], pos + k
        for w in writers.values():
            w.close()
        num_docs = len(ds)
        del ds
    shutil.rmtree(cache, ignore_errors=True)

    index = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokenizer": HF_TOKENIZER_FILE if hf_tokenizer is not None else TOKENIZER_FILE,
        "eos_id": eos,
        "bos_id": tok.bos_id,
        "corpus_fingerprint": fingerprint,
        "corpus_files": [f.relative_to(root).as_posix() for f in files],
        "num_documents": num_docs,
        "val_fraction": val_fraction,
        "split_block": SPLIT_BLOCK,
        "shard_tokens": shard_tokens,
        "splits": {s: w.info() for s, w in writers.items()},
    }
    # index.json last: a directory without it is never taken for a prepared dataset.
    _write_synced(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    return index


def _copy_hf_tokenizer(src: Path, out: Path, vocab_size: int) -> HFTokenizer:
    for f in src.iterdir():  # tokenizer.json and its configs, not the weights
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            shutil.copyfile(f, out / f.name)
    tok = HFTokenizer(out)
    if tok.vocab_size > vocab_size or tok.eos_id is None:
        raise DataError(f"the tokenizer of {src} has {tok.vocab_size} tokens (EOS "
                        f"{tok.eos_id}): it needs an EOS token and at most model.vocab_size="
                        f"{vocab_size}")
    return tok


def tokenizer_fingerprint(folder: Path) -> str:
    """sha256 of a Hugging Face folder's tokenizer.json."""
    return hashlib.sha256((folder / HF_TOKENIZER_FILE).read_bytes()).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """Exclusive flock on `.<name>.lock` next to `target` (works across processes on one host and
    on shared filesystems with flock support, e.g. NFSv4, Lustre with -o flock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", target)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare_locked(root: Path, files: list[Path], target: Path, vocab_size: int,
                    val_fraction: float, shard_tokens: int, fingerprint: str,
                    overwrite: bool = False, hf_tokenizer: Path | None = None) -> dict:
    # Holding the lock: leftovers of interrupted (killed) prepares of this target can go.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    size = sum(f.stat().st_size for f in files)
    log.info("preparing %d corpus files (%.1f MB) into %s, vocab %d", len(files), size / 1e6, target, vocab_size)
    try:
        index = _build(root, files, tmp, vocab_size, val_fraction, shard_tokens, fingerprint,
                       hf_tokenizer)
        if overwrite and target.exists():
            old = target.parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s: %d train / %d val tokens in %.1f s", target,
             index["splits"]["train"]["tokens"], index["splits"]["val"]["tokens"], time.perf_counter() - t0)
    return index


def _check_target_free(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} exists and is not a prepared dataset (no {INDEX_FILE}); "
                        "delete it or choose another data.prepared_dir / --out")


def prepare_dataset(corpus: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int,
            val_fraction: float = 0.02, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            overwrite: bool = False) -> dict:
    """Train the tokenizer and write the token shards of `corpus` into `out_dir`; returns the index.

    Refuses an existing prepared `out_dir` unless `overwrite` (which replaces it atomically)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    root, files = corpus_files(corpus)
    target = Path(out_dir).expanduser().absolute()
    with _target_lock(target):
        if (target / INDEX_FILE).exists() and not overwrite:
            raise DataError(f"{target} already holds a prepared dataset; pass overwrite=True (--force)")
        _check_target_free(target, overwrite)
        return _prepare_locked(root, files, target, vocab_size, val_fraction, shard_tokens,
                               corpus_fingerprint(root, files), overwrite)


def _cfg(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _check_matches(index: dict, target: Path, vocab_size: int, val_fraction: float, fingerprint: str) -> None:
    if index["vocab_size"] != vocab_size:
        raise DataError(f"data.prepared_dir={target} was prepared with vocab_size {index['vocab_size']}, "
                        f"but model.vocab_size={vocab_size}; set model.vocab_size={index['vocab_size']} "
                        "or use another data.prepared_dir")
    if index["corpus_fingerprint"] != fingerprint:
        raise DataError(f"data.prepared_dir={target} was prepared from a different corpus than "
                        "data.corpus (fingerprints differ); delete it to re-prepare, or use another "
                        "data.prepared_dir")
    if abs(index["val_fraction"] - val_fraction) > 1e-12:
        raise DataError(f"data.prepared_dir={target} was prepared with val_fraction "
                        f"{index['val_fraction']}, but data.val_fraction={val_fraction}; set it back "
                        "or use another data.prepared_dir")


def ensure_prepared(data_cfg: Any, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    hf_tokenizer: str | os.PathLike | None = None) -> Path:
    """Return the prepared directory for `data_cfg` (a DataConfig, DictConfig or dict with corpus,
    prepared_dir, val_fraction, auto_prepare), preparing it first if it is missing.

    `hf_tokenizer`: a Hugging Face model folder whose tokenizer is used (an imported model's
    vocabulary) instead of training one; it is part of the prepared data's identity.
    Safe to call from every rank at once: one prepares under a file lock, the others wait."""
    corpus = _cfg(data_cfg, "corpus")
    val_fraction = float(_cfg(data_cfg, "val_fraction", 0.02))
    auto_prepare = bool(_cfg(data_cfg, "auto_prepare", True))
    root, files = corpus_files(corpus)
    fingerprint = corpus_fingerprint(root, files)
    hf_tok = Path(hf_tokenizer) if hf_tokenizer is not None else None
    if hf_tok is not None:  # another vocabulary, another prepared dataset
        fingerprint = hashlib.sha256(
            (fingerprint + tokenizer_fingerprint(hf_tok)).encode()).hexdigest()
    prepared_dir = _cfg(data_cfg, "prepared_dir")
    if prepared_dir:
        target = Path(prepared_dir).expanduser().absolute()
    else:
        target = default_cache_root().absolute() / f"{fingerprint[:16]}-v{vocab_size}-val{val_fraction:g}"

    # Fast path without the lock: a directory with index.json was renamed into place complete.
    if (target / INDEX_FILE).exists():
        _check_matches(load_index(target), target, vocab_size, val_fraction, fingerprint)
        return target
    with _target_lock(target):
        if (target / INDEX_FILE).exists():  # another process prepared it while we waited
            _check_matches(load_index(target), target, vocab_size, val_fraction, fingerprint)
            return target
        _check_target_free(target, overwrite=False)
        if not auto_prepare:
            raise DataError(f"no prepared data at {target} (data.prepared_dir) and data.auto_prepare "
                            f"is false; run `python scripts/prepare_data.py --corpus {corpus} --out "
                            f"{target} --vocab-size {vocab_size} --val-fraction {val_fraction:g}` or set "
                            "data.auto_prepare=true")
        _prepare_locked(root, files, target, vocab_size, val_fraction, shard_tokens, fingerprint,
                        hf_tokenizer=hf_tok)
    load_index(target)
    return target
