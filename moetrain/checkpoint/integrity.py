"""Checksums of every checkpoint file, verified before anything in the checkpoint is unpickled.

A checkpoint is code: DCP's `.metadata` and the non-tensor entries of the shard files are
pickles, and unpickling runs whatever a crafted file says. Only load checkpoints from a source
you trust. The checksums do not make an untrusted checkpoint safe (whoever crafts one can write
matching checksums); they stop a checkpoint damaged on disk or in transfer (flipped bytes, a
truncated or missing file) from being loaded, and they are checked before any unpickling, so a
damaged `.metadata` is never handed to pickle either.

Each rank hashes the shard files it wrote, right after writing them (in the DCP writer, so a
background save hashes in the background too) and leaves `checksums.rank<r>.json`; at the
commit rank 0 adds `.metadata` and `meta.json` and merges everything into one
`checksums.json`:

    {"format": 1, "algorithm": "xxh3_128",
     "files": {".metadata": {"bytes": 4113, "digest": "9f0c..."}, "__0_0.distcp": {...}, ...}}

The hash is xxHash's XXH3-128 (the `xxhash` package): the cheapest of the candidates measured
by scripts/bench_checksum.py (about 7x faster than SHA-256 on the CI machine, close to the
speed of reading the page cache; docs/faults.md). It detects corruption, not tampering.
On load the files are split across the ranks (file i is hashed by rank i mod world size) and
every rank learns every failure before any rank reads a byte of the checkpoint through DCP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_128"
_FORMAT = 1
_CHUNK = 8 << 20
_SIDECAR = "checksums.rank{}.json"


class IntegrityError(RuntimeError):
    """A checkpoint file is missing, has the wrong size or the wrong checksum; names the file."""


def digest_file(path: Path) -> str:
    """XXH3-128 of a file's bytes as 32 hex digits (read in 8 MiB chunks; the GIL is released
    while hashing, so a background save does not stall training)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "digest": digest_file(path)}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class ChecksummingWriter(FileSystemWriter):
    """DCP's file writer, which also hashes the shard files this rank wrote and records them in
    `checksums.rank<r>.json` before reporting its writes done. DCP's coordinator writes
    `.metadata` only after every rank reported, so at the commit every rank's record exists."""

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        results = future.wait()  # FileSystemWriter writes synchronously; this returns at once
        names = sorted({r.storage_data.relative_path for r in results})
        record = {name: _entry(Path(self.path) / name) for name in names}
        _write_json(Path(self.path) / _SIDECAR.format(_rank()), record)
        return future


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(directory: Path) -> None:
    """Merge the ranks' records, add `.metadata` and `meta.json` (rank 0, at the commit, once
    both are written) and write `checksums.json`."""
    files: dict[str, Any] = {}
    for sidecar in sorted(directory.glob(_SIDECAR.format("*"))):
        files.update(json.loads(sidecar.read_text()))
    for name in (".metadata", "meta.json"):
        if (directory / name).exists():
            files[name] = _entry(directory / name)
    _write_json(directory / MANIFEST, {"format": _FORMAT, "algorithm": ALGORITHM, "files": files})
    for sidecar in directory.glob(_SIDECAR.format("*")):
        sidecar.unlink()


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's files (name -> bytes, digest); IntegrityError when it is missing or not
    a manifest. Reading it is safe: it is JSON."""
    path = directory / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path} is missing: the checkpoint has no checksums (incomplete, "
                             "or not written by this version of moetrain)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}")
        for name, entry in files.items():
            if "/" in name or name in ("", ".", "..") or not isinstance(entry["bytes"], int):
                raise ValueError(f"entry {name!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(f"{path} is not a valid checksum manifest ({err})") from None
    if ".metadata" not in files:
        raise IntegrityError(f"{path} does not list .metadata")
    return files


def _check(directory: Path, name: str, entry: dict[str, Any], hash_it: bool) -> str | None:
    """Why `name` does not match its entry, or None."""
    path = directory / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, its checksum record says {entry['bytes']}"
    if hash_it and digest_file(path) != entry["digest"]:
        return f"{path} does not match its checksum (the file is corrupt)"
    return None


def verify(directory: Path, distributed: bool = True) -> None:
    """Check every file of a checkpoint against `checksums.json`; raise IntegrityError naming
    the first bad file. With a process group (and `distributed`), the hashing is split across
    the ranks and every rank raises the same error; every rank must call it."""
    directory = Path(directory)
    group = distributed and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    problem: str | None = None
    try:
        files = read_manifest(directory)
        for i, (name, entry) in enumerate(sorted(files.items())):
            # sizes on every rank (cheap); contents by one rank each
            problem = _check(directory, name, entry, hash_it=i % world == rank)
            if problem:
                break
    except (IntegrityError, OSError) as err:
        problem = str(err)
    if group:
        problems: list[str | None] = [None] * world
        dist.all_gather_object(problems, problem)  # the ranks' own strings, between peers
        problem = next((p for p in problems if p), None)
    if problem:
        raise IntegrityError(problem)


@dataclass
class Rejected:
    """A checkpoint that `checkpoint.resume=auto` passed over, and why."""
    path: Path
    reason: str

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "reason": self.reason}
