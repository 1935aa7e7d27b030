import gzip
import json
from pathlib import Path

import pytest

from moetrain.config.schema import DataConfig, SourceConfig, TokenizerConfig
from moetrain.data.prepare import prepare_data

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "corpus"
TINY_VOCAB = 384  # also written in the test modules


def data_cfg(corpus=None, prepared_dir=None, sources=None, tokenizer=None, **kw) -> DataConfig:
    """A DataConfig; sources as [(path, weight, extra kwargs...)] or SourceConfig."""
    srcs = [s if isinstance(s, SourceConfig) else SourceConfig(path=str(s[0]), weight=s[1], **(s[2] if len(s) > 2 else {}))
            for s in (sources or [])]
    return DataConfig(corpus=None if corpus is None else str(corpus),
                      prepared_dir=None if prepared_dir is None else str(prepared_dir), sources=srcs,
                      tokenizer=TokenizerConfig(path=None if tokenizer is None else str(tokenizer)), **kw)


def write_docs(path: Path, docs: list, fmt: str, field: str = "text") -> Path:
    """Write `docs` (strings, or records as dicts) as a file of `fmt`: txt (one file per doc,
    `path` is a folder), jsonl, jsonl.gz, jsonl.zst, parquet, arrow, saved (save_to_disk folder)."""
    records = [d if isinstance(d, dict) else {field: d, "id": i} for i, d in enumerate(docs)]
    if fmt == "txt":
        path.mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(docs):
            (path / f"doc{i:03d}.txt").write_text(d)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    if fmt == "jsonl":
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(records)
        if fmt == "parquet":
            pq.write_table(table, path)
        elif fmt == "arrow":
            with pa.ipc.new_stream(path, table.schema) as w:  # the format datasets writes
                w.write_table(table)
        elif fmt == "saved":
            datasets.disable_progress_bars()
            datasets.Dataset(table).save_to_disk(str(path))
        else:
            raise ValueError(fmt)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Three ~12 KB excerpts of the shipped corpus (60 distinct characters, ~25k tokens)."""
    d = tmp_path_factory.mktemp("tiny_corpus")
    for name in ("hamlet", "macbeth", "sonnets"):
        (d / f"{name}.txt").write_text((SHIPPED / f"{name}.txt").read_text()[:12000])
    return d


@pytest.fixture(scope="session")
def tiny_prepared(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus prepared with small shards (several per split); treat as read-only."""
    out = tmp_path_factory.mktemp("tiny_prepared") / "prep"
    prepare_data(data_cfg(tiny_corpus, out, val_fraction=0.1), TINY_VOCAB, shard_tokens=4000)
    return out


@pytest.fixture(scope="session")
def spm_model(tiny_prepared) -> Path:
    """An existing sentencepiece model file (the tiny corpus' trained BPE)."""
    return tiny_prepared / "tokenizer.model"


@pytest.fixture(scope="session")
def hf_tokenizer_json(tiny_corpus, tmp_path_factory) -> Path:
    """A Hugging Face tokenizer.json (byte-level BPE, 300 tokens) built locally with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.read_text() for p in sorted(tiny_corpus.glob("*.txt"))], trainer)
    out = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(out))
    return out
