from pathlib import Path

import pytest

from moetrain.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "corpus"
TINY_VOCAB = 384  # also written in the test modules


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
    prepare_dataset(tiny_corpus, out, TINY_VOCAB, val_fraction=0.1, shard_tokens=4000)
    return out
