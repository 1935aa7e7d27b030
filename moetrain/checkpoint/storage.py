"""What a checkpoint save does when the disk does not cooperate: free space checked first, a
failed write explained in one line and cleaned up, folders left by crashes removed at start."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# The new checkpoint is about as large as the last one; both exist until the prune after the
# commit. A little headroom for meta.json, the manifest and a model that grew (upcycling).
_SPACE_MARGIN = 1.05
_NEARLY_FULL = 1 << 20  # bytes: below this, a write error is taken to be "no space left"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def space_problem(root: Path, previous: Path | None) -> str | None:
    """Why a new checkpoint does not fit next to `previous` (the newest one) in `root`, or None.
    Without a previous checkpoint there is nothing to estimate from: the write itself fails
    cleanly if the disk fills up."""
    if previous is None or not previous.is_dir():
        return None
    need = int(directory_bytes(previous) * _SPACE_MARGIN)
    probe = root if root.exists() else root.parent
    free = shutil.disk_usage(probe).free
    if free >= need:
        return None
    return (f"not enough free space for a checkpoint in {root}: {_gib(free)} free, the last "
            f"checkpoint ({previous.name}) took {_gib(directory_bytes(previous))}; free space or "
            "lower checkpoint.keep_last")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _causes(err: BaseException):
    """The exception, DCP's per-rank failures inside a CheckpointException, and their causes."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, CheckpointException):
            todo.extend(pair[0] for pair in e.failures.values())
        todo.extend([e.__cause__, e.__context__])


def write_error(err: BaseException, directory: Path) -> str:
    """One line for a failed checkpoint write: the OS's reason where there is one (no space
    left, permission denied, read-only file system), else the first line of the error."""
    for e in _causes(err):
        if isinstance(e, OSError) and e.errno is not None:
            where = f" ({e.filename})" if e.filename else ""
            return f"{os.strerror(e.errno)}{where}"
    # torch.save's C++ writer reports a full disk as "unexpected pos ..." without an errno
    try:
        probe = directory if directory.exists() else directory.parent
        free = shutil.disk_usage(probe).free
        if free < _NEARLY_FULL:
            return f"{os.strerror(errno.ENOSPC)} ({free} bytes free in {probe})"
    except OSError:
        pass
    for e in _causes(err):
        if not isinstance(e, CheckpointException):
            text = str(e).strip().splitlines()
            return text[0] if text else type(e).__name__
    return type(err).__name__


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete `step_<N>.partial/` folders that crashed saves left behind (the caller makes sure
    no save of this run is in flight); returns what was removed."""
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(PARTIAL_SUFFIX))
    for p in stale:
        remove(p)
        log.warning("removed %s, left by a checkpoint save that did not finish", p)
    return stale
