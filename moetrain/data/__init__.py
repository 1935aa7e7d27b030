"""Data: sentencepiece tokenizer -> packed token shards (memmap) -> resumable global-batch sampler."""

from moetrain.data.dataset import PackedTokenDataset
from moetrain.data.prepare import DataError, ensure_prepared, load_index, prepare_dataset
from moetrain.data.sampler import GlobalBatchSampler, val_steps
from moetrain.data.tokenizer import Tokenizer

__all__ = [
    "DataError",
    "GlobalBatchSampler",
    "PackedTokenDataset",
    "Tokenizer",
    "ensure_prepared",
    "load_index",
    "prepare_dataset",
    "val_steps",
]
