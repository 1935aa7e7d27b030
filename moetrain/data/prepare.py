"""Sources -> tokenizer + packed token shards, prepared once and shared by every rank.

`ensure_prepared` is what training calls (every rank, before any process group exists): it
returns the prepared directory of `data.*`, preparing what is missing first. Checking that a
prepared directory matches the config reads its index and the sources' file sizes and
modification times, never the files' bytes, so start-up does not grow with the corpus; a source
whose raw files are gone is taken from the index as it is.

Incremental: sources are tokenised separately, each into a folder of its own. With an existing
tokenizer (`data.tokenizer.path`), adding a source (or changing one) tokenises only that source.
A trained BPE depends on all the sources, so a different set of sources is a different prepared
directory (the default cache directory's name includes their fingerprints).

Nothing becomes visible half-written: a new directory is built in a temporary sibling and renamed
into place; a source added to an existing directory is built in a hidden folder, renamed into
place, and only then listed by a new index.json (itself renamed over the old one). Concurrent
callers serialise on a `flock` lock file next to the target (removed when done), so one process
prepares and the others wait and then load.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moetrain.data.errors import DataError
from moetrain.data.index import (
    FORMAT_VERSION, INDEX_FILE, SPLIT_BLOCK, load_index, token_dtype,
)
from moetrain.data.sources import Source, SourceFile, config_value, iter_pieces, resolve_sources
from moetrain.data.tokenize import default_num_workers, tokenize_source
from moetrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB per uint16 shard
# Characters of text a BPE is trained on at most (sentencepiece holds them all in memory): past
# this, each source contributes the start of its stream, in proportion to its size on disk.
BPE_TRAIN_CHARS = 100_000_000
TRAINED_FILE = "tokenizer.model"
_IN_TRAINING = "delete it, or point data.prepared_dir elsewhere"

__all__ = ["DEFAULT_SHARD_TOKENS", "DataError", "ensure_prepared", "prepare_data",
           "default_cache_root"]


def default_cache_root() -> Path:
    env = os.environ.get("MOETRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moetrain"


# ----------------------------------------------------------------------------- the plan

@dataclass
class _Raw:
    """A source's files as they are on disk now (None fields: the raw files are absent)."""

    fmt: str
    files: list[SourceFile]
    fingerprint: str


@dataclass
class _TokenizerSpec:
    path: Path | None  # an existing tokenizer file; None = train a BPE
    eos_token: str | None
    vocab_size: int  # of the existing tokenizer, or of the BPE to train
    sha256: str | None = None
    kind: str = "sentencepiece"


def _tokenizer_spec(data_cfg: Any, model_vocab_size: int) -> _TokenizerSpec:
    t = config_value(data_cfg, "tokenizer") or {}
    path, eos_token = config_value(t, "path"), config_value(t, "eos_token")
    if path:
        tok = Tokenizer.load(os.path.expanduser(str(path)), eos_token)
        if tok.vocab_size > model_vocab_size:
            raise DataError(f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of "
                            f"data.tokenizer.path={str(path)!r} ({tok.vocab_size} tokens); set "
                            f"model.vocab_size >= {tok.vocab_size}")
        sha = hashlib.sha256(tok.model_file.read_bytes()).hexdigest()
        return _TokenizerSpec(tok.model_file, eos_token, tok.vocab_size, sha, tok.kind)
    vocab = config_value(t, "vocab_size") or model_vocab_size
    if vocab > model_vocab_size:
        raise DataError(f"data.tokenizer.vocab_size={vocab} is larger than model.vocab_size="
                        f"{model_vocab_size}; the model must embed every token")
    return _TokenizerSpec(None, None, vocab)


def _raw(source: Source) -> _Raw | None:
    if not source.exists():
        return None
    fmt, files = source.resolve()
    return _Raw(fmt, files, source.fingerprint(fmt, files))


def _need_raw(source: Source, raw: _Raw | None) -> _Raw:
    return raw if raw is not None else _Raw(*source.resolve(), "")  # resolve() raises: missing


def _trained_on(sources: list[Source], raws: dict[str, _Raw | None], index: dict | None) -> dict:
    """{name: fingerprint} of the sources a BPE is trained on (from the index where raw is gone)."""
    out = {}
    for s in sources:
        raw = raws[s.name]
        if raw is None:
            entry = (index or {}).get("sources", {}).get(s.name)
            raw = _need_raw(s, None) if entry is None else _Raw("", [], entry["fingerprint"])
        out[s.name] = raw.fingerprint
    return out


def _default_target(spec: _TokenizerSpec, sources: list[Source], raws: dict, val_fraction: float) -> Path:
    if spec.path is None:
        key = json.dumps(["bpe", spec.vocab_size, sorted(_trained_on(sources, raws, None).items()),
                          val_fraction])
        name = f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-v{spec.vocab_size}-val{val_fraction:g}"
    else:
        name = f"tok-{spec.sha256[:16]}-val{val_fraction:g}"
    return default_cache_root().absolute() / name


def _stale(index: dict, target: Path, spec: _TokenizerSpec, sources: list[Source], raws: dict,
           val_fraction: float, fix: str) -> list[Source]:
    """The sources to (re)tokenise into an existing prepared directory; DataError when it cannot
    be updated (another tokenizer or val_fraction)."""
    where = f"data.prepared_dir={str(target)!r}"
    if abs(index["val_fraction"] - val_fraction) > 1e-12:
        raise DataError(f"{where} was prepared with val_fraction {index['val_fraction']}, but "
                        f"data.val_fraction={val_fraction}; set it back, or {fix}")
    tok = index["tokenizer"]
    if spec.path is not None:
        if tok.get("sha256") != spec.sha256:
            origin = tok.get("source") or "a BPE trained on its sources"
            raise DataError(f"{where} was prepared with another tokenizer ({origin}) than "
                            f"data.tokenizer.path={str(spec.path)!r}; {fix}")
        if tok.get("eos_token") != spec.eos_token:
            raise DataError(f"{where} was prepared with data.tokenizer.eos_token="
                            f"{tok.get('eos_token')!r}, not {spec.eos_token!r}; {fix}")
    else:
        if tok.get("source") is not None or tok["vocab_size"] != spec.vocab_size:
            what = (f"the tokenizer {tok['source']}" if tok.get("source") else
                    f"a {tok['vocab_size']}-piece BPE")
            raise DataError(f"{where} was prepared with {what}, but the config trains a "
                            f"{spec.vocab_size}-piece BPE (data.tokenizer.vocab_size, else "
                            f"model.vocab_size); {fix}")
        if tok["trained_on"] != _trained_on(sources, raws, index):
            raise DataError(
                f"{where} was prepared from other sources (its BPE was trained on "
                f"{', '.join(tok['trained_on'])} as they were then); {fix}, or keep its tokenizer "
                f"and add sources incrementally with data.tokenizer.path={target / TRAINED_FILE}")
    todo = []
    for s in sources:
        entry, raw = index["sources"].get(s.name), raws[s.name]
        if entry is None:
            _need_raw(s, raw)
            todo.append(s)
            continue
        _check_same_source(s, entry, raw, target, fix)
        if raw is not None and raw.fingerprint != entry["fingerprint"]:
            todo.append(s)  # the same path and field, other files: tokenised again
    return todo


def _check_same_source(source: Source, entry: dict, raw: _Raw | None, target: Path, fix: str) -> None:
    """A prepared source is reused (or updated) only for the same path and text field: a name
    alone matches any earlier source of that name in a shared directory, and the run would train
    on it (a typo'd glob, a source moved elsewhere). DataError naming the key, what the directory
    holds and what the config says."""
    fmt = raw.fmt if raw is not None else entry.get("format")
    field = None if fmt == "text" else source.text_field
    same_path = entry["path"] == source.path or (
        os.path.exists(source.path) and os.path.exists(entry["path"])
        and os.path.samefile(entry["path"], source.path))
    if same_path and entry.get("text_field") == field:
        return
    held = f"{entry['path']!r}" + (f" (text_field {entry['text_field']!r})"
                                   if entry.get("text_field") else "")
    n_files = len(entry.get("files", []))
    held += f", {n_files} file{'' if n_files == 1 else 's'}, {entry.get('tokens', 0):,} tokens"
    if same_path:
        key, says = f"{source.key}.text_field", f"{field!r}"
    else:
        key = source.path_key
        says = f"{source.path!r}" + (" (which matches no file)" if raw is None else "")
    rename = ("list it under data.sources with another name" if source.key == "data.corpus"
              else f"give it another name ({source.key}.name)")
    raise DataError(f"{key}={says}, but the prepared directory {target} holds the source named "
                    f"{source.name!r} made from {held}: a source is reused only for the path and "
                    f"text_field it was prepared from; correct {key}, {rename}, or {fix}")


# ----------------------------------------------------------------------------- locking

def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first."""
    made = []
    for p in reversed([path, *path.parents]):
        if not p.exists():
            p.mkdir(exist_ok=True)
            made.append(p)
    return made


@contextlib.contextmanager
def _target_lock(target: Path) -> Iterator[None]:
    """Exclusive flock on `.<name>.lock` next to `target` (works across processes on one host and
    on shared filesystems with flock support, e.g. NFSv4, Lustre with -o flock). The holder
    deletes the file when done, so a waiter re-checks that it locked the file still in place."""
    lock = target.parent / f".{target.name}.lock"
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", target)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            same = os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # the previous holder removed it: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# ----------------------------------------------------------------------------- building

def _training_lines(sources: list[Source], raws: dict[str, _Raw], cache: Path) -> Iterator[str]:
    """The lines a BPE is trained on: every source's documents in order, capped at BPE_TRAIN_CHARS."""
    total = sum(f.size for s in sources for f in raws[s.name].files)
    for s in sources:
        raw = raws[s.name]
        budget = None if total <= BPE_TRAIN_CHARS else BPE_TRAIN_CHARS * sum(f.size for f in raw.files) / total
        used = 0
        for text, end in iter_pieces(s, raw.fmt, raw.files, cache):
            if not end and text.endswith("\n"):  # a piece of a .txt document: its lines, as if whole
                text = text[:-1]
            yield from text.split("\n")
            used += len(text)
            if budget is not None and used >= budget:
                log.info("BPE: trained on the first %d characters of source %s", used, s.name)
                break


def _source_entry(source: Source, raw: _Raw, counts: dict, folder: str) -> dict:
    return {"path": source.path, "format": raw.fmt,
            "text_field": None if raw.fmt == "text" else source.text_field,
            "fingerprint": raw.fingerprint, "dir": folder,
            "files": [[f.rel, f.size, f.mtime_ns] for f in raw.files], **counts}


def _build_sources(todo: list[Source], raws: dict[str, _Raw], tok: Tokenizer, work: Path,
                   val_fraction: float, shard_tokens: int, num_workers: int) -> dict[str, dict]:
    """Tokenise each source into work/<name>-<fingerprint>/; returns their index entries."""
    entries = {}
    for s in todo:
        raw = raws[s.name]
        folder = f"{s.name}-{raw.fingerprint[:12]}"
        (work / folder).mkdir()
        counts = tokenize_source(s, raw.fmt, raw.files, tok, work / folder, val_fraction,
                                 shard_tokens, num_workers, work / ".hf_cache")
        entries[s.name] = _source_entry(s, raw, counts, folder)
    shutil.rmtree(work / ".hf_cache", ignore_errors=True)
    return entries


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_index(directory: Path, index: dict) -> None:
    # Written aside and renamed: a reader sees the old index or the new one, never a torn file.
    tmp = directory / f".{INDEX_FILE}.tmp"
    _write_synced(tmp, (json.dumps(index, indent=2) + "\n").encode())
    os.replace(tmp, directory / INDEX_FILE)


def _build_new(target: Path, spec: _TokenizerSpec, sources: list[Source], raws: dict[str, _Raw],
               val_fraction: float, shard_tokens: int, num_workers: int, overwrite: bool) -> dict:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if spec.path is None:
            log.info("training a %d-piece BPE tokenizer on %s", spec.vocab_size,
                     ", ".join(s.name for s in sources))
            tok = Tokenizer.train(_training_lines(sources, raws, tmp / ".hf_cache"), tmp / TRAINED_FILE,
                                  spec.vocab_size)
            if tok.vocab_size != spec.vocab_size:
                raise DataError(f"the trained tokenizer has {tok.vocab_size} pieces, not "
                                f"{spec.vocab_size} (data.tokenizer.vocab_size, else model.vocab_size)")
            tok_info = {"file": TRAINED_FILE, "source": None,
                        "sha256": hashlib.sha256(tok.model_file.read_bytes()).hexdigest(),
                        "trained_on": {s.name: raws[s.name].fingerprint for s in sources}}
        else:
            name = "tokenizer" + spec.path.suffix
            shutil.copyfile(spec.path, tmp / name)
            tok = Tokenizer.load(tmp / name, spec.eos_token)
            tok_info = {"file": name, "source": str(spec.path), "sha256": spec.sha256}
        tok_info.update(kind=tok.kind, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                        eos_id=tok.eos_id, eos_token=spec.eos_token)
        entries = _build_sources(sources, raws, tok, tmp, val_fraction, shard_tokens, num_workers)
        index = {"format_version": FORMAT_VERSION, "dtype": token_dtype(tok.vocab_size).name,
                 "tokenizer": tok_info, "val_fraction": val_fraction, "split_block": SPLIT_BLOCK,
                 "shard_tokens": shard_tokens, "sources": entries}
        # index.json last: a directory without it is never taken for a prepared dataset.
        _write_index(tmp, index)
        if overwrite and target.exists():
            old = target.parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _add_sources(target: Path, index: dict, todo: list[Source], raws: dict[str, _Raw],
                 shard_tokens: int, num_workers: int) -> dict:
    """Tokenise `todo` into the existing `target` with its tokenizer; returns the new index."""
    work = target / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        info = index["tokenizer"]
        tok = Tokenizer.load(target / info["file"], info.get("eos_token"))
        entries = _build_sources(todo, raws, tok, work, index["val_fraction"], shard_tokens, num_workers)
        for entry in entries.values():
            shutil.rmtree(target / entry["dir"], ignore_errors=True)  # left by an interrupted update
            os.replace(work / entry["dir"], target / entry["dir"])
        replaced = [index["sources"][n]["dir"] for n in entries if n in index["sources"]]
        index = {**index, "sources": {**index["sources"], **entries}}
        _write_index(target, index)
        for folder in replaced:
            shutil.rmtree(target / folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index


def _remove_leftovers(target: Path) -> None:
    # Holding the lock: the temporary folders of interrupted (killed) prepares can go.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.is_dir():
        for stale in target.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------- entry points

def prepare_data(data_cfg: Any, model_vocab_size: int, *, overwrite: bool = False,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, fix: str = _IN_TRAINING) -> tuple[Path, list[str]]:
    """Make the prepared directory of `data_cfg` (a DataConfig, DictConfig or dict) current.

    Returns (directory, names of the sources tokenised now). `overwrite` rebuilds it from scratch
    (atomically). `fix` is the advice in errors about a directory that cannot be reused. Safe to
    call from every rank at once: one prepares under a file lock, the others wait."""
    sources = resolve_sources(data_cfg)
    val_fraction = float(config_value(data_cfg, "val_fraction", 0.02))
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    spec = _tokenizer_spec(data_cfg, model_vocab_size)
    raws = {s.name: _raw(s) for s in sources}
    prepared_dir = config_value(data_cfg, "prepared_dir")
    target = (Path(prepared_dir).expanduser().absolute() if prepared_dir
              else _default_target(spec, sources, raws, val_fraction))
    workers = config_value(data_cfg, "num_workers") or default_num_workers()

    # Fast path without the lock: an index.json is only ever renamed into place complete.
    if not overwrite and (target / INDEX_FILE).exists():
        if not _stale(load_index(target), target, spec, sources, raws, val_fraction, fix):
            return target, []
    made = _make_dirs(target.parent)
    try:
        with _target_lock(target):
            _remove_leftovers(target)
            index = None if overwrite or not (target / INDEX_FILE).exists() else load_index(target)
            todo = sources if index is None else _stale(index, target, spec, sources, raws,
                                                         val_fraction, fix)
            if not todo:  # another process prepared it while we waited
                return target, []
            if index is None and target.exists() and not overwrite and (
                    not target.is_dir() or any(target.iterdir())):
                raise DataError(f"{target} exists and is not a prepared dataset (no {INDEX_FILE}); "
                                f"{fix}")
            if not config_value(data_cfg, "auto_prepare", True):
                raise DataError(
                    f"data.prepared_dir={str(target)!r} lacks the tokens of source(s) "
                    f"{', '.join(s.name for s in todo)} and data.auto_prepare is false; run "
                    f"`python scripts/prepare_data.py data.prepared_dir={target} ...` with this "
                    "config's data.* and model.vocab_size, or set data.auto_prepare=true")
            done = {s.name: _need_raw(s, raws[s.name]) for s in todo}
            raws.update(done)
            t0 = time.perf_counter()
            size = sum(f.size for r in done.values() for f in r.files)
            log.info("preparing %s (%.1f MB) into %s with %d workers",
                     ", ".join(done), size / 1e6, target, workers)
            if index is None:
                _build_new(target, spec, sources, raws, val_fraction, shard_tokens, workers, overwrite)
            else:
                _add_sources(target, index, todo, raws, shard_tokens, workers)
            log.info("prepared %s in %.1f s", target, time.perf_counter() - t0)
    except BaseException:
        for d in reversed(made):  # folders made for a target that never came to be
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return target, list(done)


def ensure_prepared(data_cfg: Any, model_vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """The prepared directory for `data_cfg`, preparing what is missing first (see `prepare_data`)."""
    return prepare_data(data_cfg, model_vocab_size, shard_tokens=shard_tokens)[0]
