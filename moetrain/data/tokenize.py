"""Tokenise one source into train/val token shards, on every core, in bounded memory.

The main process streams the source's documents (moetrain.data.sources) and cuts them into
tasks of about PIECE_CHARS characters; worker processes tokenise the tasks; the main process
writes the results in task order, so the output does not depend on the number of workers. At
most 2 tasks per worker are in flight, so memory does not grow with the source.

The token stream of a source is its documents in order, each followed by EOS. Once its length
is known, the stream is split into train and val: the val split is `val_fraction` of it, taken
as blocks of SPLIT_BLOCK tokens spread evenly over the stream (so that it samples the whole
source, not only its last file).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moetrain.data.errors import DataError
from moetrain.data.index import SPLIT_BLOCK, SPLITS, token_dtype
from moetrain.data.sources import PIECE_CHARS, SAVED, Source, SourceFile, iter_pieces
from moetrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_STREAM = ".stream.bin"
_MAX_PIECES_PER_TASK = 4096


def default_num_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- workers

def _forget_parents_forkserver() -> None:
    # A forked child (e.g. a rank forked by a test harness) must start a forkserver of its own:
    # the inherited one is not its child (waitpid fails) and is shared with the parent.
    from multiprocessing import forkserver

    server = forkserver._forkserver
    for attr in ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_forkserver_authkey"):
        if hasattr(server, attr):
            setattr(server, attr, None)
    server._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_parents_forkserver)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_file: str, eos_token: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_file, eos_token)


def encode_task(tok: Tokenizer, texts: list[str], ends: list[bool], dtype: np.dtype) -> np.ndarray:
    """The token ids of consecutive pieces, with EOS after each piece that ends a document."""
    ids = tok.encode_batch(texts)
    eos = [tok.eos_id]
    parts = [p for piece, end in zip(ids, ends) for p in ((piece, eos) if end else (piece,))]
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype,
                       count=sum(len(p) for p in parts))


def _encode_in_worker(texts: list[str], ends: list[bool], dtype: str) -> np.ndarray:
    return encode_task(_worker_tokenizer, texts, ends, np.dtype(dtype))


def _tasks(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= PIECE_CHARS or len(texts) >= _MAX_PIECES_PER_TASK:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def _encoded(tasks: Iterator[tuple[list[str], list[bool]]], tok: Tokenizer, dtype: np.dtype,
             num_workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids, documents ended) per task, in task order."""
    if num_workers <= 1:
        for texts, ends in tasks:
            yield encode_task(tok, texts, ends, dtype), sum(ends)
        return
    # forkserver: workers start from a fresh single-threaded server that imported only this
    # module (fork from a process running pyarrow/torch threads can deadlock; spawn would
    # re-import the caller's __main__, e.g. the whole trainer).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(num_workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(str(tok.model_file), tok.eos_token))
    pending: deque = deque()
    try:
        for texts, ends in tasks:
            pending.append((pool.submit(_encode_in_worker, texts, ends, dtype.str), sum(ends)))
            if len(pending) >= 2 * num_workers:
                future, docs = pending.popleft()
                yield future.result(), docs
        while pending:
            future, docs = pending.popleft()
            yield future.result(), docs
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- progress

class _Progress:
    """A progress bar over the source's bytes on disk, with tokens/s and ETA (on a terminal; a
    log line per source otherwise)."""

    # On-disk bytes per character of text, before a whole file has been read.
    _GUESS = {"text": 1.0, "json": 1.05, "arrow": 1.0, SAVED: 1.0, "parquet": 0.4}

    def __init__(self, source: Source, fmt: str, files: list[SourceFile]):
        from tqdm.auto import tqdm

        self.sizes = [sum(f.size for f in files)] if fmt == SAVED else [f.size for f in files]
        compressed = fmt == "json" and files and str(files[0].path).endswith((".gz", ".zst"))
        self.ratio = 0.3 if compressed else self._GUESS.get(fmt, 1.0)
        self.file, self.chars, self.done_bytes, self.shown = 0, 0, 0, 0
        self.tokens, self.start, self.last_postfix = 0, time.perf_counter(), 0.0
        self.bar = tqdm(total=sum(self.sizes), unit="B", unit_scale=True, dynamic_ncols=True,
                        desc=f"tokenising {source.name}", disable=None, file=sys.stderr, leave=False)

    def read(self, file: int, chars: int) -> None:
        if file != self.file:
            done = sum(self.sizes[self.file : file])
            if self.chars:  # measured: the next files of the source are alike
                self.ratio = self.sizes[self.file] / self.chars
            self.done_bytes += done
            self.file, self.chars = file, 0
        self.chars += chars
        at = self.done_bytes + min(int(self.chars * self.ratio), self.sizes[file])
        if at > self.shown:
            self.bar.update(at - self.shown)
            self.shown = at

    def wrote(self, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last_postfix > 0.5:
            self.bar.set_postfix_str(f"{self.tokens / (now - self.start):,.0f} tok/s", refresh=False)
            self.last_postfix = now

    def close(self) -> None:
        self.bar.update(max(0, sum(self.sizes) - self.shown))
        self.bar.close()


# ----------------------------------------------------------------------------- shards

class ShardWriter:
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


def is_val_block(b: int | np.ndarray, n_blocks: int, n_val: int):
    # Bresenham spreading: exactly n_val of the n_blocks blocks, evenly spaced.
    return (b + 1) * n_val // n_blocks > b * n_val // n_blocks


def split_stream(stream: Path, out_dir: Path, dtype: np.dtype, val_fraction: float,
                 shard_tokens: int, what: str) -> dict:
    """Cut the token stream file into train/val shards in `out_dir`; returns {split: info}."""
    total = stream.stat().st_size // dtype.itemsize
    n_blocks = -(-total // SPLIT_BLOCK)
    n_val = 0 if val_fraction <= 0 else max(1, round(n_blocks * val_fraction))
    if n_val >= n_blocks:
        raise DataError(f"data.val_fraction={val_fraction} leaves no training tokens of {what} "
                        f"({total} tokens in all)")
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    step = 1024  # blocks per read
    # Plain reads, not a memmap: mapped pages would count in this process' memory (RSS).
    with open(stream, "rb") as fh:
        for b0 in range(0, n_blocks, step):
            chunk = np.frombuffer(fh.read(step * SPLIT_BLOCK * dtype.itemsize), dtype=dtype)
            val = is_val_block(np.arange(b0, min(b0 + step, n_blocks)), n_blocks, n_val)
            # Consecutive blocks of one split are written in one piece.
            edges = np.flatnonzero(np.diff(val.astype(np.int8))) + 1
            for lo, hi in zip(np.r_[0, edges], np.r_[edges, val.size]):
                writers["val" if val[lo] else "train"].write(chunk[lo * SPLIT_BLOCK : hi * SPLIT_BLOCK])
    for w in writers.values():
        w.close()
    return {s: w.info() for s, w in writers.items()}


# ----------------------------------------------------------------------------- one source

def tokenize_source(source: Source, fmt: str, files: list[SourceFile], tok: Tokenizer,
                    out_dir: Path, val_fraction: float, shard_tokens: int, num_workers: int,
                    cache_dir: Path) -> dict:
    """Write the shards of `source` into the (empty, private) folder `out_dir`; returns the
    counts {num_documents, tokens, splits}. Raises DataError for bad records or an empty source."""
    dtype = token_dtype(tok.vocab_size)
    stream = out_dir / _STREAM
    progress = _Progress(source, fmt, files)
    t0 = time.perf_counter()
    docs = tokens = 0
    try:
        pieces = iter_pieces(source, fmt, files, cache_dir, progress.read)
        with open(stream, "wb") as fh:
            for ids, ended in _encoded(_tasks(pieces), tok, dtype, num_workers):
                fh.write(ids.tobytes())
                docs += ended
                tokens += ids.size
                progress.wrote(ids.size)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    if docs == 0:
        field = "" if fmt == "text" else f" in field {source.text_field!r}"
        raise DataError(f"{source.path_key}={source.path!r}: the source is empty (no text{field})")
    splits = split_stream(stream, out_dir, dtype, val_fraction, shard_tokens, f"source {source.name!r}")
    stream.unlink()
    log.info("tokenised %s: %d documents, %d tokens in %.1f s (%.0f tokens/s, %d workers)",
             source.name, docs, tokens, seconds, tokens / max(seconds, 1e-9), num_workers)
    return {"num_documents": docs, "tokens": tokens, "splits": splits}
