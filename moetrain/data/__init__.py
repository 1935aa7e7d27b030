"""Data: text sources -> tokenizer -> packed token shards (memmap) -> resumable mixture sampler.

Exports are imported on first use, so that the preparation's worker processes (which import
moetrain.data.tokenize) load neither torch nor the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import Any

from moetrain.data.errors import DataError, DataExhausted

_EXPORTS = {
    "PackedTokenDataset": "dataset",
    "MixtureDataset": "dataset",
    "mixture_datasets": "dataset",
    "MixtureSampler": "sampler",
    "val_steps": "sampler",
    "Tokenizer": "tokenizer",
    "load_index": "index",
    "load_prepared_tokenizer": "index",
    "ensure_prepared": "prepare",
    "prepare_data": "prepare",
    "Source": "sources",
    "resolve_sources": "sources",
}

__all__ = ["DataError", "DataExhausted", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"moetrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moetrain.data' has no attribute {name!r}")
