import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import moetrain.data.prepare as prep
from moetrain.config.schema import DataConfig
from moetrain.data import DataError, Tokenizer, ensure_prepared, load_index, prepare_dataset

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "corpus"
TINY_VOCAB = 384  # as in conftest.py (not imported: several conftest modules may exist)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _split_stream(d: Path, split: str) -> np.ndarray:
    index = load_index(d)
    parts = [np.fromfile(d / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _cfg(corpus, prepared_dir=None, **kw) -> DataConfig:
    return DataConfig(corpus=str(corpus), prepared_dir=None if prepared_dir is None else str(prepared_dir), **kw)


@pytest.fixture
def count_builds(monkeypatch, tmp_path):
    """Count real prepares (calls of the builder) across processes, via a file."""
    log = tmp_path / "builds.log"
    real = prep._build

    def spy(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the window in which a concurrent caller could also start
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "_build", spy)
    return lambda: len(log.read_text().split()) if log.exists() else 0


def test_stream_is_documents_with_eos_and_split_is_exact(tiny_corpus, tiny_prepared):
    index = load_index(tiny_prepared)
    tok = Tokenizer(tiny_prepared / index["tokenizer"])
    expected = np.concatenate([np.array(tok.encode(f.read_text()) + [tok.eos_id])
                               for f in sorted(tiny_corpus.glob("*.txt"))])
    train, val = _split_stream(tiny_prepared, "train"), _split_stream(tiny_prepared, "val")
    assert index["splits"]["train"]["tokens"] == train.size and index["splits"]["val"]["tokens"] == val.size
    assert train.size + val.size == expected.size
    assert (expected == tok.eos_id).sum() == 3 == index["num_documents"]
    # Reassemble the stream from the two splits, block by block.
    B = index["split_block"]
    n_blocks = -(-expected.size // B)
    n_val = round(n_blocks * 0.1)
    assert 0.05 < val.size / expected.size < 0.15
    got, it, iv = [], 0, 0
    for b in range(n_blocks):
        n = min(B, expected.size - b * B)
        if prep._is_val_block(b, n_blocks, n_val):
            got.append(val[iv : iv + n]); iv += n
        else:
            got.append(train[it : it + n]); it += n
    np.testing.assert_array_equal(np.concatenate(got), expected)
    # Small shards: several per split, each within the limit.
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(0 < s["tokens"] <= 4000 for s in shards)
    assert index["dtype"] == "uint16" and index["vocab_size"] == TINY_VOCAB


def test_val_blocks_are_spread_evenly():
    assert [b for b in range(100) if prep._is_val_block(b, 100, 5)] == [19, 39, 59, 79, 99]
    assert sum(prep._is_val_block(b, 436, 9) for b in range(436)) == 9
    assert not any(prep._is_val_block(b, 10, 0) for b in range(10))


def test_prepare_is_deterministic(tiny_corpus, tiny_prepared, tmp_path):
    again = tmp_path / "again"
    prepare_dataset(tiny_corpus, again, TINY_VOCAB, val_fraction=0.1, shard_tokens=4000)
    assert _files(again) == _files(tiny_prepared)
    assert not list(again.glob(".*")), "no cache or temporary files left in the prepared dir"


def test_val_fraction_zero_and_uint32(tiny_corpus, tmp_path):
    index = prepare_dataset(tiny_corpus, tmp_path / "p", TINY_VOCAB, val_fraction=0.0)
    assert index["splits"]["val"] == {"tokens": 0, "shards": []}
    assert prep.token_dtype(65536) == np.uint16 and prep.token_dtype(65537) == np.uint32


def test_truncated_shard_is_refused(tiny_prepared, tiny_corpus, tmp_path):
    d = tmp_path / "prep"
    shutil.copytree(tiny_prepared, d)
    victim = d / "train_00001.bin"
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 2)
    with pytest.raises(DataError, match="train_00001.bin"):
        load_index(d)
    with pytest.raises(DataError, match="train_00001.bin.*truncated"):
        ensure_prepared(_cfg(tiny_corpus, d, val_fraction=0.1), TINY_VOCAB)
    victim.unlink()
    with pytest.raises(DataError, match="train_00001.bin is missing"):
        load_index(d)


def test_interrupted_prepare_leaves_nothing(tiny_corpus, tmp_path, monkeypatch):
    calls = []

    def boom(self, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing shards

    monkeypatch.setattr(prep._ShardWriter, "write", boom)
    target = tmp_path / "out" / "prep"
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared(_cfg(tiny_corpus, target), TINY_VOCAB)
    assert len(calls) == 3
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".prep.lock"]


def test_stale_temp_dir_of_killed_prepare_is_ignored_and_removed(tiny_corpus, tmp_path, count_builds):
    target = tmp_path / "prep"
    stale = tmp_path / ".prep.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\0" * 10)
    assert ensure_prepared(_cfg(tiny_corpus, target), TINY_VOCAB) == target
    assert count_builds() == 1 and not stale.exists()


def test_ensure_prepared_default_cache_dir_and_reuse(tiny_corpus, tmp_path, monkeypatch, count_builds):
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    d = ensure_prepared(_cfg(tiny_corpus), TINY_VOCAB)
    fp = load_index(d)["corpus_fingerprint"]
    assert d == tmp_path / "cache" / f"{fp[:16]}-v{TINY_VOCAB}-val0.02"
    assert ensure_prepared({"corpus": str(tiny_corpus)}, TINY_VOCAB) == d  # a dict works too
    assert count_builds() == 1
    # Another vocabulary size is another directory.
    assert ensure_prepared(_cfg(tiny_corpus), TINY_VOCAB + 16).name.endswith(f"-v{TINY_VOCAB + 16}-val0.02")
    assert count_builds() == 2


def test_ensure_prepared_errors(tiny_corpus, tiny_prepared, tmp_path):
    with pytest.raises(DataError, match=r"data\.corpus=.*no such file"):
        ensure_prepared(_cfg(tmp_path / "missing"), TINY_VOCAB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.corpus=.*no non-empty \.txt"):
        ensure_prepared(_cfg(tmp_path / "empty"), TINY_VOCAB)
    with pytest.raises(DataError, match=r"data\.prepared_dir.*data\.auto_prepare.*prepare_data\.py"):
        ensure_prepared(_cfg(tiny_corpus, tmp_path / "nothing", auto_prepare=False), TINY_VOCAB)
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(DataError, match=r"model\.vocab_size=512"):
        ensure_prepared(_cfg(tiny_corpus, tiny_prepared, val_fraction=0.1), 512)
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.02"):
        ensure_prepared(_cfg(tiny_corpus, tiny_prepared, val_fraction=0.02), TINY_VOCAB)
    other = tmp_path / "other"
    shutil.copytree(tiny_corpus, other)
    (other / "hamlet.txt").write_text("changed")
    with pytest.raises(DataError, match="different corpus"):
        ensure_prepared(_cfg(other, tiny_prepared, val_fraction=0.1), TINY_VOCAB)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        ensure_prepared(_cfg(tiny_corpus, junk), TINY_VOCAB)
    assert (junk / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="already holds"):
        prepare_dataset(tiny_corpus, tiny_prepared, TINY_VOCAB)


def _ensure_in_child(corpus, target, barrier, results):
    import torch

    torch.set_num_threads(1)
    barrier.wait()
    try:
        results.put(str(ensure_prepared(_cfg(corpus, target), TINY_VOCAB)))
    except BaseException as e:  # report, don't hang the parent
        results.put(f"error: {e!r}")


def test_concurrent_ensure_prepared_prepares_once(tiny_corpus, tmp_path, count_builds):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    target = tmp_path / "shared" / "prep"
    procs = [ctx.Process(target=_ensure_in_child, args=(tiny_corpus, target, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got == [str(target)] * 2
    assert count_builds() == 1
    load_index(target)


def test_default_corpus_is_the_shipped_one():
    root, files = prep.corpus_files(DataConfig().corpus)
    assert root == SHIPPED and len(files) >= 10


def test_cli(tiny_corpus, tmp_path, capsys):
    import runpy

    cli = runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="not_main")["main"]
    args = ["--corpus", str(tiny_corpus), "--out", str(tmp_path / "p"), "--vocab-size", str(TINY_VOCAB)]
    assert cli(args) == 0
    assert "train +" in capsys.readouterr().out
    assert cli(args) == 1 and "--force" in capsys.readouterr().err
    assert cli(args + ["--force", "--val-fraction", "0.2"]) == 0
    assert load_index(tmp_path / "p")["val_fraction"] == 0.2


@pytest.fixture(scope="module")
def shipped_8k(tmp_path_factory):
    out = tmp_path_factory.mktemp("shipped") / "prep"
    t0 = time.perf_counter()
    path = ensure_prepared(DataConfig(prepared_dir=str(out)), 8192)
    return path, time.perf_counter() - t0


def test_shipped_corpus_8k(shipped_8k):
    path, seconds = shipped_8k
    index = load_index(path)
    total = sum(s["tokens"] for s in index["splits"].values())
    size = sum(f.stat().st_size for f in SHIPPED.glob("*.txt"))
    print(f"\nshipped corpus: {size} bytes, {total} tokens at vocab 8192, prepared in {seconds:.2f} s")
    assert 1.2e6 < size < 1.8e6
    assert index["vocab_size"] == 8192 and index["dtype"] == "uint16"
    assert 3.0 < size / total < 4.5, "about 3.3 characters per token for English verse"
    assert 0.015 < index["splits"]["val"]["tokens"] / total < 0.025
    tok = Tokenizer.from_prepared(path)
    assert tok.vocab_size == 8192
    text = (SHIPPED / "sonnets.txt").read_text()
    assert tok.decode(tok.encode(text)) == text
    assert json.loads((path / "index.json").read_text()) == index
