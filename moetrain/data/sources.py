"""Text sources: which files a configured source is, and its documents, read as a stream.

A source (`data.sources[i]`, or `data.corpus` as a one-source shorthand) is a file, a folder or a
glob of one format, or a folder written by `datasets.Dataset.save_to_disk`:

    .txt                       one file = one document (read in pieces that end at a newline)
    .jsonl .jsonl.gz .jsonl.zst one JSON object per line = one document, text in `text_field`
    .parquet .arrow            one row = one document, text in the column `text_field`

Records are streamed through `datasets` (local files only), so memory does not grow with the
source. Every problem is a `DataError` naming the config key and the path.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moetrain.data.errors import DataError

_REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CORPUS = _REPO_ROOT / "data" / "corpus"

# suffix -> `datasets` builder ("text" is read here, see _read_txt)
FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".jsonl.zst": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
SAVED = "saved"  # a datasets.save_to_disk folder
VALID_FORMATS = ", ".join(FORMATS) + " files, or a datasets.save_to_disk folder"

# Text per task handed to a tokenising worker, and the longest piece a .txt file is cut into.
PIECE_CHARS = 1 << 20
_BATCH_ROWS = 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


def file_format(path: str | os.PathLike) -> str | None:
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def _strip_format(name: str) -> str:
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_path(path: str) -> str:
    # The schema's "${moetrain_root:}" is resolved by the config layer; resolve it here too so that
    # a plain DataConfig works.
    return os.path.expanduser(str(path).replace("${moetrain_root:}", str(_REPO_ROOT)))


def default_name(path: str) -> str:
    """The name of a source given by `path`: the file name without its format suffix, the folder
    name, or for a glob the last folder before the first wildcard."""
    p = expand_path(path).rstrip("/")
    if _GLOB_CHARS.search(p):
        head = p[: _GLOB_CHARS.search(p).start()]
        return Path(head[: head.rfind("/") + 1]).name or "source"
    return _strip_format(Path(p).name) or "source"


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str  # relative to the source root (recorded in the prepared index)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Source:
    """One configured source. `key` is its config key, for messages ("data.sources[1]")."""

    key: str
    name: str
    path: str  # expanded, absolute
    weight: float
    text_field: str

    @property
    def path_key(self) -> str:
        return "data.corpus" if self.key == "data.corpus" else f"{self.key}.path"

    def exists(self) -> bool:
        if _GLOB_CHARS.search(self.path):
            return bool(glob.glob(self.path, recursive=True))
        return os.path.exists(self.path)

    def resolve(self) -> tuple[str, list[SourceFile]]:
        """(format, files in reading order); stats only, no file is read. Raises DataError."""
        where = f"{self.path_key}={self.path!r}"
        p = Path(self.path)
        if _GLOB_CHARS.search(self.path):
            paths = sorted(Path(f) for f in glob.glob(self.path, recursive=True) if os.path.isfile(f))
            if not paths:
                raise DataError(f"{where} matches no file")
            head = self.path[: _GLOB_CHARS.search(self.path).start()]
            root = Path(head[: head.rfind("/") + 1] or ".")
            unknown = [f for f in paths if file_format(f) is None]
            if unknown:
                raise DataError(f"{where}: unknown format of {unknown[0]}; valid: {VALID_FORMATS}")
        elif p.is_dir():
            if (p / "dataset_dict.json").is_file():
                splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
                raise DataError(f"{where} is a saved DatasetDict (splits {', '.join(splits)}); point "
                                f"it at one split's folder, e.g. {p / (splits[0] if splits else 'train')}")
            if (p / "state.json").is_file():
                state = json.loads((p / "state.json").read_text())
                files = [p / f["filename"] for f in state.get("_data_files", [])]
                return SAVED, [_stat(f, p) for f in files]
            root = p
            paths = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f) is not None
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not paths:
                raise DataError(f"{where}: the folder has no {VALID_FORMATS.replace(' files, or', ' files (or is not')})")
        elif p.is_file():
            if file_format(p) is None:
                raise DataError(f"{where}: unknown format of {p.name}; valid: {VALID_FORMATS}")
            root, paths = p.parent, [p]
        else:
            raise DataError(f"{where}: no such file or folder")
        formats = sorted({file_format(f) for f in paths})
        if len(formats) > 1:
            raise DataError(f"{where} mixes formats ({', '.join(formats)}); one source is one format: "
                            "split it into several sources or use a glob")
        files = [_stat(f, root) for f in paths]
        if all(f.size == 0 for f in files):
            raise DataError(f"{where}: the source is empty (all {len(files)} files have 0 bytes)")
        return formats[0], files

    def fingerprint(self, fmt: str, files: list[SourceFile]) -> str:
        """Identity of the source's content for the prepared index: format, text field, and each
        file's name, size and modification time (not its bytes: start-up must not read the data)."""
        listing = [fmt, self.text_field if fmt != "text" else None,
                   [[f.rel, f.size, f.mtime_ns] for f in files]]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _stat(path: Path, root: Path) -> SourceFile:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path} is missing (listed by {root})") from None
    return SourceFile(path, path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.key of a DataConfig / DictConfig, or cfg[key] of a dict; `default` when absent or null."""
    value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
    return default if value is None else value


def resolve_sources(data_cfg: Any) -> list[Source]:
    """The sources of a DataConfig (or a dict like one): `data.sources`, else `data.corpus` as one
    source, else the shipped corpus. Checks names and weights, not the files."""
    corpus = config_value(data_cfg, "corpus")
    configured = list(config_value(data_cfg, "sources", None) or [])
    if corpus and configured:
        raise DataError("data.corpus and data.sources are both set; data.corpus is a shorthand for "
                        "one source: set data.corpus=null, or list it under data.sources")
    if not configured:
        path = str(corpus) if corpus else str(SHIPPED_CORPUS)
        return [Source("data.corpus", default_name(path), os.path.abspath(expand_path(path)), 1.0, "text")]
    sources, names = [], {}
    for i, s in enumerate(configured):
        key = f"data.sources[{i}]"
        path = config_value(s, "path", "")
        if not path:
            raise DataError(f"{key}.path is empty; give a file, folder or glob of {VALID_FORMATS}")
        weight = config_value(s, "weight", 1.0)
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0):
            raise DataError(f"{key}.weight={weight!r} is invalid: must be a number > 0")
        name = config_value(s, "name") or default_name(path)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise DataError(f"{key}.name={name!r} is invalid: letters, digits, '_', '.', '-' only "
                            "(it names metrics and folders)")
        if name in names:
            raise DataError(f"{key}.name={name!r} is already the name of data.sources[{names[name]}]; "
                            f"set {key}.name to tell them apart")
        names[name] = i
        field = config_value(s, "text_field", "text") or "text"
        sources.append(Source(key, name, os.path.abspath(expand_path(path)), float(weight), str(field)))
    return sources


# ----------------------------------------------------------------------------- reading

def iter_pieces(source: Source, fmt: str, files: list[SourceFile], cache_dir: Path,
                progress=None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) in order: every document once, empty ones skipped; a .txt document
    may come in several pieces, each ending at a newline. `progress(file_index, chars_read)` is
    called as files are read. Raises DataError for records without the text field, non-string
    text and unreadable files."""
    if fmt == "text":
        for i, f in enumerate(files):
            for piece, last in _read_txt(source, f.path):
                if progress:
                    progress(i, len(piece))
                yield piece, last
        return
    for i, f in enumerate(files if fmt != SAVED else files[:1]):
        rows = _iter_rows(source, fmt, f.path, cache_dir)
        where = source.path if fmt == SAVED else f.path
        n = 0
        for batch, fields in rows:
            for text in batch:
                n += 1
                if not isinstance(text, str):
                    if text is None:
                        raise DataError(f"{source.key}.text_field={source.text_field!r}: record {n} of "
                                        f"{where} has no {source.text_field!r} (or it is null); its "
                                        f"fields: {', '.join(fields)}")
                    raise DataError(f"{source.key}.text_field={source.text_field!r}: record {n} of "
                                    f"{where} holds a {type(text).__name__}, not a string")
                if progress:
                    progress(i, len(text))
                if text:
                    yield text, True


def _read_txt(source: Source, path: Path) -> Iterator[tuple[str, bool]]:
    # Read here rather than by datasets' text builder, which holds a whole document in memory.
    # Text mode: universal newlines, like that builder.
    try:
        with open(path, encoding="utf-8") as fh:
            pending = fh.read(PIECE_CHARS)
            while pending:
                more = fh.read(PIECE_CHARS)
                if not more:
                    yield pending, True
                    return
                cut = pending.rfind("\n") + 1 or len(pending)
                yield pending[:cut], False
                pending = pending[cut:] + more
    except UnicodeDecodeError as e:
        raise DataError(f"{source.path_key}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_rows(source: Source, fmt: str, path: Path, cache_dir: Path) -> Iterator[tuple[list, list[str]]]:
    """Batches of the text column of one file (or of a saved dataset), and the fields there are."""
    datasets = _datasets()
    try:
        if fmt == SAVED:
            ds = datasets.load_from_disk(source.path)
        else:
            ds = datasets.load_dataset(FORMATS_BUILDER[fmt], data_files=[str(path)], split="train",
                                       streaming=True, cache_dir=str(cache_dir))
        fields = list(ds.features or {})
        if fields and source.text_field not in fields:
            raise DataError(f"{source.key}.text_field={source.text_field!r}: {path if fmt != SAVED else source.path} "
                            f"has no field {source.text_field!r}; its fields: {', '.join(fields)}")
        for batch in ds.iter(batch_size=_BATCH_ROWS):
            if source.text_field not in batch:
                raise DataError(f"{source.key}.text_field={source.text_field!r}: {path} has no field "
                                f"{source.text_field!r}; its fields: {', '.join(batch)}")
            yield batch[source.text_field], fields or list(batch)
    except DataError:
        raise
    except Exception as e:  # pyarrow / datasets raise many types; name the file in every case
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"{source.path_key}: cannot read {path} as {fmt}: {msg}") from None


FORMATS_BUILDER = {"json": "json", "parquet": "parquet", "arrow": "arrow"}


def _datasets():
    # Never touch the network, and keep the console clean.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets
