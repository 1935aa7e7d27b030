"""Fixed-length training sequences cut from prepared token streams (memory-mapped shards): one
source's split (`PackedTokenDataset`), or several sources side by side (`MixtureDataset`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moetrain.data.errors import DataError
from moetrain.data.index import INDEX_FILE, load_index
from moetrain.data.sources import resolve_sources


class PackedTokenDataset:
    """The shards of one split of one source, read as one concatenated token stream.

    Sample i is the window stream[i*seq_len : i*seq_len + seq_len + 1]: inputs are [:-1],
    targets [1:], so consecutive samples share one boundary token and every token is a target
    exactly once. Windows may span shard boundaries (shards are only a storage unit) and document
    boundaries (documents are separated by EOS). len = floor((tokens - 1) / seq_len).
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str, seq_len: int,
                 source: str | None = None, index: dict | None = None):
        """`source`: its name in the prepared directory; None = its only source. `index`: the
        directory's index when the caller has loaded it already."""
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be positive")
        self.prepared_dir = Path(prepared_dir)
        index = load_index(self.prepared_dir) if index is None else index
        sources = index["sources"]
        if source is None:
            if len(sources) != 1:
                raise DataError(f"{self.prepared_dir} holds {len(sources)} sources "
                                f"({', '.join(sources)}); name one")
            source = next(iter(sources))
        if source not in sources:
            raise DataError(f"source {source!r} is not in {self.prepared_dir / INDEX_FILE} (it has "
                            f"{', '.join(sources)})")
        entry = sources[source]
        if split not in entry["splits"]:
            raise DataError(f"split {split!r} not in {self.prepared_dir} (has {sorted(entry['splits'])})")
        self.source, self.split, self.seq_len = source, split, seq_len
        self.vocab_size: int = index["tokenizer"]["vocab_size"]
        self.eos_id: int = index["tokenizer"]["eos_id"]
        dtype = np.dtype(index["dtype"])
        shards = [s for s in entry["splits"][split]["shards"] if s["tokens"] > 0]
        folder = self.prepared_dir / entry["dir"]
        self._shards = [np.memmap(folder / s["file"], dtype=dtype, mode="r") for s in shards]
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


class MixtureDataset:
    """The sequences of several sources' splits, indexed side by side: global index
    offsets[s] + i is sequence i of source s (what `MixtureSampler` draws).

    For evaluation, `order` maps a position to a global index, so that consecutive positions
    interleave the sources by weight (see `eval_order`); None = positions are global indices.
    """

    def __init__(self, prepared_dir: str | os.PathLike, split: str, seq_len: int,
                 sources: Sequence[str], weights: Sequence[float] | None = None,
                 order: np.ndarray | None = None):
        index = load_index(prepared_dir)
        self.names = list(sources)
        self.weights = [1.0] * len(self.names) if weights is None else list(weights)
        self.parts = [PackedTokenDataset(prepared_dir, split, seq_len, name, index) for name in self.names]
        self.sizes = [len(p) for p in self.parts]
        self.offsets = np.cumsum([0] + self.sizes)
        self.seq_len, self.split = seq_len, split
        self.vocab_size = self.parts[0].vocab_size
        self.eos_id = self.parts[0].eos_id  # one tokenizer for every source
        self.order = order

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.order is None else len(self.order)

    def locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(source number, index within the source) of each global index."""
        g = np.asarray(indices, dtype=np.int64)
        if self.order is not None:
            g = self.order[g]
        if g.size and not (0 <= g.min() and g.max() < self.offsets[-1]):
            raise IndexError(f"sample out of range for {int(self.offsets[-1])} samples ({self.split})")
        src = np.searchsorted(self.offsets, g, side="right") - 1
        return src, g - self.offsets[src]

    def __getitem__(self, i: int) -> torch.Tensor:
        """LongTensor [seq_len + 1]."""
        return self.get_batch([i])[0]

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor [len(indices), seq_len + 1]."""
        src, local = self.locate(indices)
        out = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(src.tolist(), local.tolist())):
            out[row] = self.parts[s]._window(i * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(out)


def mixture_datasets(prepared_dir: str | os.PathLike, data_cfg: Any,
                     eval_batches: int) -> tuple[MixtureDataset, MixtureDataset | None]:
    """(train, val) of the sources of `data_cfg` (DataConfig) in a prepared directory; val is None
    when eval_batches is 0 (moetrain/evaluation.py picks each source's evaluation batches)."""
    sources = resolve_sources(data_cfg)
    names, weights = [s.name for s in sources], [s.weight for s in sources]
    train = MixtureDataset(prepared_dir, "train", data_cfg.seq_len, names, weights)
    if eval_batches <= 0:
        return train, None
    return train, MixtureDataset(prepared_dir, "val", data_cfg.seq_len, names, weights)
