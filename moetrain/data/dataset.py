"""Fixed-length training sequences cut from a prepared token stream (memory-mapped shards)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moetrain.data.prepare import DataError, load_index


class PackedTokenDataset:
    """The shards of one split, read as one concatenated token stream.

    Sample i is the window stream[i*seq_len : i*seq_len + seq_len + 1]: inputs are [:-1],
    targets [1:], so consecutive samples share one boundary token and every token is a target
    exactly once. Windows may span shard boundaries (shards are only a storage unit) and document
    boundaries (documents are separated by EOS). len = floor((tokens - 1) / seq_len).
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str, seq_len: int):
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be positive")
        self.prepared_dir = Path(prepared_dir)
        index = load_index(self.prepared_dir)
        if split not in index["splits"]:
            raise DataError(f"split {split!r} not in {self.prepared_dir} (has {sorted(index['splits'])})")
        self.split, self.seq_len = split, seq_len
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        dtype = np.dtype(index["dtype"])
        shards = [s for s in index["splits"][split]["shards"] if s["tokens"] > 0]
        self._shards = [np.memmap(self.prepared_dir / s["file"], dtype=dtype, mode="r") for s in shards]
        # _starts[k] = stream offset of shard k; _starts[-1] = total tokens.
        self._starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self.num_tokens = int(self._starts[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def _window(self, start: int, n: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        off = start - int(self._starts[k])
        shard = self._shards[k]
        if off + n <= shard.shape[0]:  # the common case: inside one shard
            return np.asarray(shard[off : off + n], dtype=np.int64)
        parts, need = [], n
        while need:
            piece = self._shards[k][off : off + need]
            parts.append(np.asarray(piece, dtype=np.int64))
            need -= piece.shape[0]
            k, off = k + 1, 0
        return np.concatenate(parts)

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples ({self.split})")
        return i

    def __getitem__(self, i: int) -> torch.Tensor:
        """LongTensor [seq_len + 1]."""
        return torch.from_numpy(self._window(self._check(i) * self.seq_len, self.seq_len + 1))

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor [len(indices), seq_len + 1]."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self._window(self._check(i) * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(out)
