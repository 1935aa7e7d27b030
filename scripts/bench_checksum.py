#!/usr/bin/env python
"""Throughput of the candidate checkpoint checksums, on one core, over a file in the page cache.

    python scripts/bench_checksum.py [--mib 512] [--repeats 3] [--dir /tmp]

Writes a file of random bytes (the shard file of a checkpoint is incompressible weights), reads
it once to put it in the page cache, then times each hash over the file read in 8 MiB chunks,
the way moetrain/checkpoint/integrity.py reads it. Prints GB/s per hash (the best of
`--repeats`) and the plain read for comparison. Results and the choice they support:
docs/faults.md ("Checksums").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

CHUNK = 8 << 20


def _candidates() -> dict[str, Callable[[], object]]:
    """name -> factory of an object with update(bytes) (hashlib's interface)."""
    out: dict[str, Callable[[], object]] = {}
    try:
        import xxhash

        out["xxh3_128"] = xxhash.xxh3_128
        out["xxh3_64"] = xxhash.xxh3_64
    except ImportError:
        pass

    class Crc32:
        def __init__(self) -> None:
            self.value = 0

        def update(self, data) -> None:
            self.value = zlib.crc32(data, self.value)

    out["crc32 (zlib)"] = Crc32
    try:
        import crc32c

        class Crc32c:
            def __init__(self) -> None:
                self.value = 0

            def update(self, data) -> None:
                self.value = crc32c.crc32c(data, self.value)

        out["crc32c"] = Crc32c
    except ImportError:
        pass
    for name in ("sha256", "sha1", "md5", "blake2b"):
        out[name] = getattr(hashlib, name)
    return out


def _time(path: Path, make: Callable[[], object] | None) -> float:
    h = make() if make is not None else None
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            if h is not None:
                h.update(view[:n])
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="file size in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    with tempfile.NamedTemporaryFile(dir=args.dir, suffix=".bench") as tmp:
        path = Path(tmp.name)
        for _ in range(args.mib):
            tmp.write(os.urandom(1 << 20))
        tmp.flush()
        _time(path, None)  # into the page cache
        size = args.mib << 20
        rows = [("read only", None), *_candidates().items()]
        print(f"{'hash':<14} {'GB/s':>7}   ({args.mib} MiB, best of {args.repeats})")
        for name, make in rows:
            best = min(_time(path, make) for _ in range(args.repeats))
            print(f"{name:<14} {size / best / 1e9:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
