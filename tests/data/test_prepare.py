import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import moetrain.data.prepare as prep
import moetrain.data.sources as srcmod
import moetrain.data.tokenize as tokmod
from moetrain.config.schema import DataConfig
from moetrain.data import DataError, MixtureDataset, Tokenizer, ensure_prepared, load_index, prepare_data
from moetrain.data.index import load_prepared_tokenizer
from tests.data.conftest import data_cfg, write_docs

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "corpus"
TINY_VOCAB = 384  # as in conftest.py


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _split_stream(d: Path, split: str, source: str | None = None) -> np.ndarray:
    index = load_index(d)
    entry = index["sources"][source or next(iter(index["sources"]))]
    parts = [np.fromfile(d / entry["dir"] / s["file"], dtype=index["dtype"]) for s in entry["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _stream(d: Path, source: str | None = None) -> np.ndarray:
    """The source's whole token stream, reassembled from its two splits block by block."""
    index = load_index(d)
    entry = index["sources"][source or next(iter(index["sources"]))]
    train, val = _split_stream(d, "train", source), _split_stream(d, "val", source)
    total, B = train.size + val.size, index["split_block"]
    n_blocks = -(-total // B)
    n_val = 0 if index["val_fraction"] == 0 else max(1, round(n_blocks * index["val_fraction"]))
    got, it, iv = [], 0, 0
    for b in range(n_blocks):
        n = min(B, total - b * B)
        if tokmod.is_val_block(b, n_blocks, n_val):
            got.append(val[iv : iv + n]); iv += n
        else:
            got.append(train[it : it + n]); it += n
    assert entry["tokens"] == total
    return np.concatenate(got)


def _expected(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    return np.concatenate([np.array(tok.encode(d) + [tok.eos_id]) for d in docs if d])


@pytest.fixture
def count_builds(monkeypatch, tmp_path):
    """Count sources tokenised (calls of tokenize_source) across processes, via a file."""
    log = tmp_path / "builds.log"
    real = prep.tokenize_source

    def spy(source, *args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{source.name}\n")
        time.sleep(0.3)  # widen the window in which a concurrent caller could also start
        return real(source, *args, **kwargs)

    monkeypatch.setattr(prep, "tokenize_source", spy)
    return lambda: log.read_text().split() if log.exists() else []


def test_stream_is_documents_with_eos_and_split_is_exact(tiny_corpus, tiny_prepared):
    index = load_index(tiny_prepared)
    tok = load_prepared_tokenizer(tiny_prepared)
    expected = _expected(tok, [f.read_text() for f in sorted(tiny_corpus.glob("*.txt"))])
    np.testing.assert_array_equal(_stream(tiny_prepared), expected)
    (entry,) = index["sources"].values()
    val = entry["splits"]["val"]["tokens"]
    assert 0.05 < val / expected.size < 0.15
    assert (expected == tok.eos_id).sum() == 3 == entry["num_documents"]
    # Small shards: several per split, each within the limit.
    shards = entry["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(0 < s["tokens"] <= 4000 for s in shards)
    assert index["dtype"] == "uint16" and index["tokenizer"]["vocab_size"] == TINY_VOCAB
    assert entry["files"][0][:2] == ["hamlet.txt", (tiny_corpus / "hamlet.txt").stat().st_size]


def test_val_blocks_are_spread_evenly():
    assert [b for b in range(100) if tokmod.is_val_block(b, 100, 5)] == [19, 39, 59, 79, 99]
    assert sum(tokmod.is_val_block(b, 436, 9) for b in range(436)) == 9
    assert not any(tokmod.is_val_block(b, 10, 0) for b in range(10))


def test_prepare_is_deterministic_and_leaves_no_lock(tiny_corpus, tiny_prepared, tmp_path):
    again = tmp_path / "again"
    prepare_data(data_cfg(tiny_corpus, again, val_fraction=0.1), TINY_VOCAB, shard_tokens=4000)
    assert _files(again) == _files(tiny_prepared)
    assert not [p for p in again.rglob(".*")], "no cache or temporary files left in the prepared dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"], "no .lock or temporary folder left"


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "saved"])
def test_every_format_is_tokenised_with_an_existing_tokenizer(tmp_path, fmt, hf_tokenizer_json, tiny_corpus):
    docs = [f.read_text()[:3000] for f in sorted(tiny_corpus.glob("*.txt"))] + ["", "short one"]
    path = write_docs(tmp_path / ("src" if fmt in ("txt", "saved") else f"src.{fmt}"), docs, fmt)
    out = tmp_path / "prep"
    prepare_data(data_cfg(prepared_dir=out, sources=[(path, 1.0, {"name": "s"})], tokenizer=hf_tokenizer_json,
                          val_fraction=0.0, num_workers=1), 512)
    tok = load_prepared_tokenizer(out)
    assert tok.kind == "tokenizers" and tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    np.testing.assert_array_equal(_stream(out, "s"), _expected(tok, docs))
    assert load_index(out)["sources"]["s"]["num_documents"] == 4


def test_workers_and_pieces_do_not_change_the_tokens(tiny_corpus, tiny_prepared, tmp_path, monkeypatch):
    # Many small tasks and .txt pieces, tokenised by 2 worker processes: the same shards as one
    # process reading whole documents.
    monkeypatch.setattr(srcmod, "PIECE_CHARS", 500)
    monkeypatch.setattr(tokmod, "PIECE_CHARS", 2000)
    out = tmp_path / "w2"
    prepare_data(data_cfg(tiny_corpus, out, val_fraction=0.1, num_workers=2,
                          tokenizer=tiny_prepared / "tokenizer.model"),
                 TINY_VOCAB, shard_tokens=4000)
    a = {k: v for k, v in _files(out).items() if k.endswith(".bin")}
    b = {k: v for k, v in _files(tiny_prepared).items() if k.endswith(".bin")}
    assert list(a.values()) == list(b.values()) and len(a) > 4


def test_sources_are_added_incrementally_with_an_existing_tokenizer(tmp_path, spm_model, count_builds):
    a = write_docs(tmp_path / "a.jsonl", ["alpha " * 300, "beta " * 300], "jsonl")
    b = write_docs(tmp_path / "b.parquet", ["gamma " * 400], "parquet")
    out = tmp_path / "prep"
    cfg = data_cfg(prepared_dir=out, sources=[(a, 1.0)], tokenizer=spm_model, val_fraction=0.0)
    assert prepare_data(cfg, TINY_VOCAB)[1] == ["a"]
    a_dir = out / load_index(out)["sources"]["a"]["dir"]
    a_inode = (a_dir / "train_00000.bin").stat().st_ino
    cfg2 = data_cfg(prepared_dir=out, sources=[(a, 3.0), (b, 1.0)], tokenizer=spm_model, val_fraction=0.0)
    assert prepare_data(cfg2, TINY_VOCAB)[1] == ["b"]
    assert count_builds() == ["a", "b"]
    assert (a_dir / "train_00000.bin").stat().st_ino == a_inode  # source a untouched
    assert sorted(load_index(out)["sources"]) == ["a", "b"]
    ds = MixtureDataset(out, "train", 16, ["a", "b"])
    assert ds.sizes == [len(ds.parts[0]), len(ds.parts[1])] and min(ds.sizes) > 0
    # A changed source (new modification time) is tokenised again, into a new folder.
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    b_dir = load_index(out)["sources"]["b"]["dir"]
    assert prepare_data(cfg2, TINY_VOCAB)[1] == ["b"]
    assert load_index(out)["sources"]["b"]["dir"] != b_dir and not (out / b_dir).exists()
    assert prepare_data(cfg2, TINY_VOCAB)[1] == [] and count_builds() == ["a", "b", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.parquet", "builds.log", "prep"]


def test_training_needs_neither_the_raw_files_nor_a_pass_over_them(tmp_path, spm_model, monkeypatch):
    a = write_docs(tmp_path / "raw" / "a.jsonl", ["alpha " * 300, "beta " * 300], "jsonl")
    out = tmp_path / "prep"
    cfg = data_cfg(prepared_dir=out, sources=[(a, 1.0)], tokenizer=spm_model, val_fraction=0.0)
    ensure_prepared(cfg, TINY_VOCAB)
    before = _files(out)

    def no_reading(*args, **kwargs):
        raise AssertionError("the raw files were read")

    monkeypatch.setattr(prep, "tokenize_source", no_reading)
    monkeypatch.setattr(prep, "iter_pieces", no_reading)
    # The same size and modification time: taken as unchanged (its bytes are never read).
    st = a.stat()
    a.write_bytes(a.read_bytes().replace(b"alpha", b"ALPHA"))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ensure_prepared(cfg, TINY_VOCAB) == out
    shutil.rmtree(tmp_path / "raw")  # the raw corpus is gone: train from the prepared tokens
    assert ensure_prepared(cfg, TINY_VOCAB) == out
    assert _files(out) == before
    assert len(MixtureDataset(out, "train", 8, ["a"])) > 0


def test_a_source_is_reused_only_for_the_path_and_field_it_was_prepared_from(
        tmp_path, spm_model, monkeypatch, count_builds):
    """The shared default cache of an existing tokenizer holds every run's sources by name: a
    name alone must not stand for a source (issue 22: a typo'd glob trained on an earlier run's
    data)."""
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    web = write_docs(tmp_path / "web" / "a.jsonl", ["alpha " * 300, "beta " * 300], "jsonl")
    glob = f"{web.parent}/*.jsonl"
    d = ensure_prepared(data_cfg(sources=[(glob, 1.0)], tokenizer=spm_model), TINY_VOCAB)
    before = _files(d)
    held = f"made from {glob!r} (text_field 'text'), 1 file, "
    cases = {  # config -> (the key named, what the config says)
        f"{glob}.zstd": ("data.sources[0].path", f"{glob + '.zstd'!r} (which matches no file)"),
        str(tmp_path / "nowhere" / "web"): ("data.sources[0].path", "(which matches no file)"),
    }
    other = write_docs(tmp_path / "other" / "web" / "b.jsonl", ["gamma " * 300], "jsonl")
    cases[f"{other.parent}/*.jsonl"] = ("data.sources[0].path", f"'{other.parent}/*.jsonl',")
    for path, (key, says) in cases.items():
        with pytest.raises(DataError) as err:
            ensure_prepared(data_cfg(sources=[(path, 1.0)], tokenizer=spm_model), TINY_VOCAB)
        msg = str(err.value)
        assert msg.startswith(f"{key}=") and says in msg and f"holds the source named 'web' {held}" in msg
        assert "give it another name (data.sources[0].name)" in msg
    with pytest.raises(DataError, match=r"^data\.sources\[0\]\.text_field='body', but .* 'web' made "
                       r"from .*\(text_field 'text'\)"):
        ensure_prepared(data_cfg(sources=[(glob, 1.0, {"text_field": "body"})], tokenizer=spm_model),
                        TINY_VOCAB)
    assert _files(d) == before and count_builds() == ["web"]  # nothing tokenised or changed
    # Named apart, the other source is prepared next to it; the original is still reused, also
    # once its raw files are gone (same path and field).
    named = [(f"{other.parent}/*.jsonl", 1.0, {"name": "web2"})]
    assert ensure_prepared(data_cfg(sources=named, tokenizer=spm_model), TINY_VOCAB) == d
    shutil.rmtree(web.parent)
    assert ensure_prepared(data_cfg(sources=[(glob, 1.0)], tokenizer=spm_model), TINY_VOCAB) == d
    assert count_builds() == ["web", "web2"]


def test_a_trained_tokenizer_ties_the_directory_to_its_sources(tiny_corpus, tiny_prepared, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_corpus, other)
    (other / "hamlet.txt").write_text("changed")
    with pytest.raises(DataError, match=r"prepared from other sources.*data\.tokenizer\.path=.*tokenizer\.model"):
        ensure_prepared(data_cfg(other, tiny_prepared, val_fraction=0.1), TINY_VOCAB)
    # As the message says: keep its tokenizer, and the new source is added to it.
    d = tmp_path / "prep"
    shutil.copytree(tiny_prepared, d)
    cfg = data_cfg(prepared_dir=d, sources=[(tiny_corpus, 1.0), (other, 1.0)], tokenizer=d / "tokenizer.model",
                   val_fraction=0.1)
    assert prepare_data(cfg, TINY_VOCAB)[1] == ["other"]
    assert sorted(load_index(d)["sources"]) == ["other", "tiny_corpus0"]


def test_interrupted_prepare_leaves_nothing(tiny_corpus, tmp_path, monkeypatch):
    calls = []

    def boom(self, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing shards

    monkeypatch.setattr(tokmod.ShardWriter, "write", boom)
    target = tmp_path / "out" / "deeper" / "prep"
    with pytest.raises(KeyboardInterrupt):
        ensure_prepared(data_cfg(tiny_corpus, target), TINY_VOCAB)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == [], "no prepared dir, no .lock, no folders made for it"


def test_a_bad_record_deep_in_a_source_leaves_nothing(tmp_path, spm_model):
    good = write_docs(tmp_path / "src" / "a.jsonl", ["fine text " * 50] * 20, "jsonl")
    write_docs(tmp_path / "src" / "b.jsonl", ["fine"] * 5 + [{"txt": "typo"}], "jsonl")
    out = tmp_path / "out" / "prep"
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.text_field='text': record 6 of .*b\.jsonl"):
        ensure_prepared(data_cfg(prepared_dir=out, sources=[(good.parent, 1.0)], tokenizer=spm_model), TINY_VOCAB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    # An existing directory stays as it was when adding a source fails.
    ensure_prepared(data_cfg(prepared_dir=out, sources=[(good, 1.0)], tokenizer=spm_model), TINY_VOCAB)
    before = _files(out)
    with pytest.raises(DataError, match="record 6"):
        ensure_prepared(data_cfg(prepared_dir=out, sources=[(good, 1.0), (tmp_path / "src" / "b.jsonl", 1.0)],
                                 tokenizer=spm_model), TINY_VOCAB)
    assert _files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["prep"]


def test_stale_temp_dir_of_killed_prepare_is_ignored_and_removed(tiny_corpus, tmp_path, count_builds):
    target = tmp_path / "prep"
    stale = tmp_path / ".prep.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\0" * 10)
    (tmp_path / ".prep.lock").write_text("")  # left by a SIGKILLed prepare
    assert ensure_prepared(data_cfg(tiny_corpus, target), TINY_VOCAB) == target
    assert count_builds() == ["tiny_corpus0"] and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "prep"]


def test_ensure_prepared_default_cache_dir_and_reuse(tiny_corpus, tmp_path, monkeypatch, count_builds, spm_model):
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "cache"))
    d = ensure_prepared(data_cfg(tiny_corpus), TINY_VOCAB)
    assert d.parent == tmp_path / "cache" and d.name.endswith(f"-v{TINY_VOCAB}-val0.02")
    assert ensure_prepared({"corpus": str(tiny_corpus)}, TINY_VOCAB) == d  # a dict works too
    assert len(count_builds()) == 1
    # Another vocabulary size is another directory; an existing tokenizer's is named by its hash.
    assert ensure_prepared(data_cfg(tiny_corpus), TINY_VOCAB + 16).name.endswith(f"-v{TINY_VOCAB + 16}-val0.02")
    assert ensure_prepared(data_cfg(tiny_corpus, tokenizer=spm_model), TINY_VOCAB).name.startswith("tok-")
    assert len(count_builds()) == 3


def test_ensure_prepared_errors(tiny_corpus, tiny_prepared, tmp_path, hf_tokenizer_json):
    with pytest.raises(DataError, match=r"data\.corpus=.*missing.*no such file"):
        ensure_prepared(data_cfg(tmp_path / "missing"), TINY_VOCAB)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"data\.corpus=.*empty"):
        ensure_prepared(data_cfg(tmp_path / "empty"), TINY_VOCAB)
    with pytest.raises(DataError, match=r"data\.auto_prepare is false.*prepare_data\.py"):
        ensure_prepared(data_cfg(tiny_corpus, tmp_path / "nothing", auto_prepare=False), TINY_VOCAB)
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(DataError, match=r"a 384-piece BPE, but the config trains a 512-piece BPE"):
        ensure_prepared(data_cfg(tiny_corpus, tiny_prepared, val_fraction=0.1), 512)
    sized = data_cfg(tiny_corpus, tiny_prepared, val_fraction=0.1)
    sized.tokenizer.vocab_size = 320  # data.tokenizer.vocab_size itself, not model.vocab_size's
    with pytest.raises(DataError, match=r"a 384-piece BPE, but the config trains a 320-piece BPE"):
        ensure_prepared(sized, 4096)
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.02"):
        ensure_prepared(data_cfg(tiny_corpus, tiny_prepared, val_fraction=0.02), TINY_VOCAB)
    with pytest.raises(DataError, match=r"another tokenizer .* than data\.tokenizer\.path"):
        ensure_prepared(data_cfg(tiny_corpus, tiny_prepared, val_fraction=0.1, tokenizer=hf_tokenizer_json),
                        TINY_VOCAB)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared dataset"):
        ensure_prepared(data_cfg(tiny_corpus, junk), TINY_VOCAB)
    assert (junk / "notes.txt").read_text() == "mine"


def test_tokenizer_and_vocabulary_checks(tiny_corpus, tmp_path, spm_model, hf_tokenizer_json):
    with pytest.raises(DataError, match=r"model\.vocab_size=300 is smaller than the vocabulary of "
                                        r"data\.tokenizer\.path=.*tokenizer\.model.*384 tokens"):
        ensure_prepared(data_cfg(tiny_corpus, tmp_path / "p", tokenizer=spm_model), 300)
    # at the boundary: 384 tokens (ids 0..383) need 384 embedding rows, not 383
    with pytest.raises(DataError, match=r"model\.vocab_size=383 is smaller than the vocabulary"):
        ensure_prepared(data_cfg(tiny_corpus, tmp_path / "p", tokenizer=spm_model), 383)
    with pytest.raises(DataError, match=r"data\.tokenizer\.vocab_size=512 is larger than model\.vocab_size=384"):
        cfg = data_cfg(tiny_corpus, tmp_path / "p")
        cfg.tokenizer.vocab_size = 512
        ensure_prepared(cfg, 384)
    with pytest.raises(DataError, match=r"data\.tokenizer\.path=.*nope\.json.*no such file"):
        ensure_prepared(data_cfg(tiny_corpus, tmp_path / "p", tokenizer=tmp_path / "nope.json"), 384)
    assert not (tmp_path / "p").exists()
    # A model larger than the tokenizer is fine (padded embedding); the BPE can be smaller too.
    d = ensure_prepared(data_cfg(tiny_corpus, tmp_path / "hf", tokenizer=hf_tokenizer_json), 4096)
    assert load_index(d)["tokenizer"]["vocab_size"] == 300 and load_index(d)["dtype"] == "uint16"
    cfg = data_cfg(tiny_corpus, tmp_path / "small")
    cfg.tokenizer.vocab_size = 320
    assert load_index(ensure_prepared(cfg, 4096))["tokenizer"]["vocab_size"] == 320


def test_truncated_shard_is_refused(tiny_prepared, tiny_corpus, tmp_path):
    d = tmp_path / "prep"
    shutil.copytree(tiny_prepared, d)
    victim = next(d.glob("*/train_00001.bin"))
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 2)
    with pytest.raises(DataError, match="train_00001.bin"):
        load_index(d)
    with pytest.raises(DataError, match="train_00001.bin.*truncated"):
        ensure_prepared(data_cfg(tiny_corpus, d, val_fraction=0.1), TINY_VOCAB)
    victim.unlink()
    with pytest.raises(DataError, match="train_00001.bin is missing"):
        load_index(d)


def _ensure_in_child(corpus, target, barrier, results):
    barrier.wait()
    try:
        results.put(str(ensure_prepared(data_cfg(corpus, target), TINY_VOCAB)))
    except BaseException as e:  # report, don't hang the parent
        import traceback
        results.put(f"error: {e!r} {traceback.format_exc()}")


def test_concurrent_ensure_prepared_prepares_once(tiny_corpus, tmp_path, count_builds):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    target = tmp_path / "shared" / "prep"
    procs = [ctx.Process(target=_ensure_in_child, args=(tiny_corpus, target, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got == [str(target)] * 2
    assert len(count_builds()) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["prep"]
    load_index(target)


def test_cli(tiny_corpus, tmp_path, capsys):
    import runpy

    cli = runpy.run_path(str(REPO / "scripts" / "prepare_data.py"), run_name="not_main")["main"]
    args = ["--corpus", str(tiny_corpus), "--out", str(tmp_path / "p"), "--vocab-size", str(TINY_VOCAB)]
    assert cli(args) == 0
    assert "train +" in capsys.readouterr().out
    assert cli(args) == 0 and "up to date" in capsys.readouterr().out
    assert cli(args + ["--val-fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "overwrite=True" not in err and err.count("\n") == 1
    assert cli(args + ["--force", "--val-fraction", "0.2", "--workers", "2"]) == 0
    assert load_index(tmp_path / "p")["val_fraction"] == 0.2
    assert cli(["--out", str(tmp_path / "q"), "data.sources=[{path: " + str(tmp_path / "none.jsonl") + "}]"]) == 2
    err = capsys.readouterr().err
    assert "data.sources[0].path=" in err and "none.jsonl" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"], "no .lock, nothing half-written"


@pytest.fixture(scope="module")
def shipped_8k(tmp_path_factory):
    out = tmp_path_factory.mktemp("shipped") / "prep"
    t0 = time.perf_counter()
    path = ensure_prepared(DataConfig(prepared_dir=str(out)), 8192)
    return path, time.perf_counter() - t0


def test_shipped_corpus_8k(shipped_8k):
    path, seconds = shipped_8k
    index = load_index(path)
    (entry,) = index["sources"].values()
    total = entry["tokens"]
    size = sum(f.stat().st_size for f in SHIPPED.glob("*.txt"))
    print(f"\nshipped corpus: {size} bytes, {total} tokens at vocab 8192, prepared in {seconds:.2f} s")
    assert 1.2e6 < size < 1.8e6 and len(entry["files"]) == 12  # the .txt files, not README.md
    assert index["tokenizer"]["vocab_size"] == 8192 and index["dtype"] == "uint16"
    assert 3.0 < size / total < 4.5, "about 3.3 characters per token for English verse"
    assert 0.015 < entry["splits"]["val"]["tokens"] / total < 0.025
    tok = load_prepared_tokenizer(path)
    assert tok.vocab_size == 8192
    text = (SHIPPED / "sonnets.txt").read_text()
    assert tok.decode(tok.encode(text)) == text
    assert json.loads((path / "index.json").read_text()) == index
