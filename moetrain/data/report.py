"""What a run reads, in words: the prepared directory, its tokenizer, and each configured source
with the path, text field, files and token counts it was prepared from.

The lines go to the console and every rank's log at the start (`log_data`) and, as comments, at
the end of the run's config.yaml (`config_comment`), so that a run directory says which data
it trained on, not only which data its config named.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

from moetrain.data.index import read_index
from moetrain.data.sources import resolve_sources

log = logging.getLogger("moetrain.data")

MAX_LISTED_FILES = 1000  # per source in config.yaml; index.json of the directory lists them all


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def summary(prepared_dir: str | os.PathLike, data_cfg: Any) -> list[str]:
    """One line for the directory and its tokenizer, then one per configured source (in config
    order): weight, path, text field, files, bytes, train and validation tokens."""
    d = Path(prepared_dir)
    index = read_index(d)
    tok = index["tokenizer"]
    origin = (f"a copy of {tok['source']}" if tok.get("source") else
              f"trained here on {', '.join(tok.get('trained_on', {}))}")
    lines = [f"data: {d} (tokenizer {tok['file']}: {origin}; vocabulary {tok['vocab_size']:,}, "
             f"EOS id {tok['eos_id']})"]
    sources = resolve_sources(data_cfg)
    total = sum(s.weight for s in sources)
    for s in sources:
        e = index["sources"][s.name]
        field = f", text_field {e['text_field']}" if e.get("text_field") else ""
        size = sum(f[1] for f in e.get("files", []))
        n_files = len(e.get("files", []))
        splits = e.get("splits", {})
        lines.append(
            f"  source {s.name} (weight {s.weight / total:.3g}): {e['path']}{field}, "
            f"{n_files} file{'' if n_files == 1 else 's'}, {_size(size)} -> "
            f"{splits.get('train', {}).get('tokens', 0):,} train + "
            f"{splits.get('val', {}).get('tokens', 0):,} validation tokens")
    return lines


def files(prepared_dir: str | os.PathLike, data_cfg: Any) -> dict[str, list[str]]:
    """Each configured source's files as prepared: 'relative name, bytes, modified (UTC)'."""
    index = read_index(prepared_dir)
    out = {}
    for s in resolve_sources(data_cfg):
        e = index["sources"][s.name]
        out[s.name] = [
            f"{rel}  {size} bytes  modified "
            f"{_dt.datetime.fromtimestamp(mtime / 1e9, _dt.timezone.utc):%Y-%m-%d %H:%M:%S}"
            for rel, size, mtime in e.get("files", [])]
    return out


def log_data(prepared_dir: str | os.PathLike, data_cfg: Any) -> None:
    """The summary on the console (rank 0) and in the log; each file in the rank's log only."""
    for line in summary(prepared_dir, data_cfg):
        log.info("%s", line)
    for name, listed in files(prepared_dir, data_cfg).items():
        for line in listed:
            log.debug("source %s file %s", name, line)


def config_comment(prepared_dir: str | os.PathLike, data_cfg: Any) -> str:
    """The summary and each source's files as YAML comments, for the end of config.yaml."""
    out = ["", "# The data this run read (the prepared directory, and what each source was "
               "prepared from):"]
    out += [f"# {line}" for line in summary(prepared_dir, data_cfg)]
    for name, listed in files(prepared_dir, data_cfg).items():
        out.append(f"#   files of {name}:")
        out += [f"#     {line}" for line in listed[:MAX_LISTED_FILES]]
        if len(listed) > MAX_LISTED_FILES:
            out.append(f"#     ... and {len(listed) - MAX_LISTED_FILES} more (the directory's "
                       "index.json lists them all)")
    return "\n".join(out) + "\n"


__all__ = ["config_comment", "files", "log_data", "summary"]
