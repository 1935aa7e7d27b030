import json
import os

import pytest

import moetrain.data.sources as srcmod
from moetrain.data import DataError
from moetrain.data.sources import SAVED, default_name, iter_pieces, resolve_sources
from tests.data.conftest import data_cfg, write_docs

DOCS = ["To be, or not to be:\nthat is the question.\n", "", "Café — naïve 東京 🙂\n\n  spaced  ",
        "x" * 300 + "\nlast line without newline"]
FORMATS = ["txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "saved"]


def _one(path, **kw):
    (source,) = resolve_sources(data_cfg(sources=[(path, 1.0, kw)]))
    return source


def _read(source, tmp_path):
    fmt, files = source.resolve()
    return fmt, files, [t for t, end in iter_pieces(source, fmt, files, tmp_path / "cache") if end]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_documents_in_order(tmp_path, fmt):
    path = write_docs(tmp_path / ("docs" if fmt in ("txt", "saved") else f"docs.{fmt}"), DOCS, fmt)
    got_fmt, files, docs = _read(_one(path), tmp_path)
    assert docs == [d for d in DOCS if d]  # empty documents are skipped
    assert got_fmt == {"txt": "text", "jsonl.gz": "json", "jsonl.zst": "json", "jsonl": "json",
                       "saved": SAVED}.get(fmt, fmt)
    assert all(f.size > 0 for f in files) or fmt == "txt"


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet", "arrow"])
def test_folders_and_globs_of_shards(tmp_path, fmt):
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    write_docs(d / f"b.{fmt}", ["second"], fmt)
    write_docs(d / "sub" / f"c.{fmt}", ["third"], fmt)
    write_docs(d / f"a.{fmt}", ["first", "first again"], fmt)
    write_docs(d / f".hidden.{fmt}", ["never"], fmt)
    (d / "README.md").write_text("not a source format: ignored in a folder")
    assert _read(_one(d), tmp_path)[2] == ["first", "first again", "second", "third"]
    assert _read(_one(str(d / f"*.{fmt}")), tmp_path)[2] == ["first", "first again", "second"]
    assert _read(_one(str(d / f"**/*.{fmt}")), tmp_path)[2] == ["first", "first again", "second", "third"]
    assert [f.rel for f in _one(d).resolve()[1]] == [f"a.{fmt}", f"b.{fmt}", f"sub/c.{fmt}"]


def test_text_field_and_long_txt_documents_in_pieces(tmp_path, monkeypatch):
    path = write_docs(tmp_path / "d.jsonl", [{"content": "a", "text": "ignored"}, {"content": "b"}], "jsonl")
    assert _read(_one(path, text_field="content"), tmp_path)[2] == ["a", "b"]
    monkeypatch.setattr(srcmod, "PIECE_CHARS", 64)
    text = "".join(f"line {i} of a long document\n" for i in range(40)) + "no newline at the end"
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "a.txt").write_text(text)
    source = _one(tmp_path / "long")
    fmt, files = source.resolve()
    pieces = list(iter_pieces(source, fmt, files, tmp_path))
    assert len(pieces) > 5 and [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.endswith("\n") and len(p) <= 2 * 64 for p, _ in pieces[:-1])
    assert "".join(p for p, _ in pieces) == text


def _error(tmp_path, path, **kw):
    with pytest.raises(DataError) as e:
        _read(_one(path, **kw), tmp_path)
    return str(e.value)


def test_bad_sources_name_the_key_and_the_path(tmp_path):
    msg = _error(tmp_path, tmp_path / "missing.jsonl")
    assert "data.sources[0].path=" in msg and "missing.jsonl" in msg and "no such file" in msg
    (tmp_path / "data.csv").write_text("a,b\n")
    msg = _error(tmp_path, tmp_path / "data.csv")
    assert "data.sources[0].path=" in msg and "data.csv" in msg and ".jsonl.zst" in msg
    msg = _error(tmp_path, str(tmp_path / "*.parquet"))
    assert "data.sources[0].path=" in msg and "matches no file" in msg
    (tmp_path / "mixed").mkdir()
    write_docs(tmp_path / "mixed" / "a.jsonl", ["x"], "jsonl")
    write_docs(tmp_path / "mixed" / "b.parquet", ["y"], "parquet")
    assert "mixes formats (json, parquet)" in _error(tmp_path, tmp_path / "mixed")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.md").write_text("x")
    assert "none" in _error(tmp_path, tmp_path / "none") and "has no" in _error(tmp_path, tmp_path / "none")


def test_records_without_the_field_or_with_non_string_text(tmp_path):
    path = write_docs(tmp_path / "a.jsonl", [{"text": "ok"}, {"content": "where is text?", "id": 3}], "jsonl")
    msg = _error(tmp_path, path)
    assert "data.sources[0].text_field='text'" in msg and str(path) in msg and "record 2" in msg
    assert "content" in msg and "id" in msg  # the fields there are
    path = write_docs(tmp_path / "b.jsonl", [{"body": "x", "id": 1}], "jsonl")
    msg = _error(tmp_path, path)
    assert "has no field 'text'" in msg and "its fields: body, id" in msg and str(path) in msg
    path = write_docs(tmp_path / "c.parquet", [{"body": "x"}], "parquet")
    assert "has no field 'text'; its fields: body" in _error(tmp_path, path)
    assert "has no field 'body2'" in _error(tmp_path, path, text_field="body2")
    path = write_docs(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 12}], "jsonl")
    msg = _error(tmp_path, path)
    assert "record 2" in msg and "holds a int, not a string" in msg and str(path) in msg
    path = write_docs(tmp_path / "e.parquet", [{"text": 1.5}], "parquet")
    assert "holds a float, not a string" in _error(tmp_path, path)
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\nnot json at all\n')
    msg = _error(tmp_path, tmp_path / "f.jsonl")
    assert "cannot read" in msg and "f.jsonl" in msg and "data.sources[0].path" in msg
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "a.txt").write_bytes(b"caf\xe9\n")
    assert "not UTF-8" in _error(tmp_path, tmp_path / "g")


def test_empty_sources(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    assert "the source is empty" in _error(tmp_path, tmp_path / "e.jsonl")
    saved = write_docs(tmp_path / "dd", ["x"], "saved")
    import datasets

    datasets.DatasetDict({"train": datasets.load_from_disk(str(saved))}).save_to_disk(str(tmp_path / "dict"))
    msg = _error(tmp_path, tmp_path / "dict")
    assert "DatasetDict" in msg and "train" in msg


def test_names_weights_and_the_corpus_shorthand(tmp_path):
    assert default_name("/data/web/part-*.jsonl.zst") == "web"
    assert default_name("/data/code.parquet") == "code"
    assert default_name("/data/wiki/") == "wiki"
    assert default_name("/data/books.jsonl.gz") == "books"
    (shipped,) = resolve_sources(data_cfg())
    assert shipped.key == "data.corpus" and shipped.path.endswith(os.path.join("data", "corpus"))
    (corpus,) = resolve_sources(data_cfg(tmp_path / "c.txt"))
    assert (corpus.name, corpus.weight, corpus.path) == ("c", 1.0, str(tmp_path / "c.txt"))
    with pytest.raises(DataError, match=r"data\.corpus and data\.sources are both set"):
        resolve_sources(data_cfg(tmp_path, sources=[(tmp_path, 1.0)]))
    with pytest.raises(DataError, match=r"data\.sources\[1\]\.name='web' is already the name of data\.sources\[0\]"):
        resolve_sources(data_cfg(sources=[("/a/web/*.jsonl", 1.0), ("/b/web", 2.0)]))
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.weight=0\.0 is invalid"):
        resolve_sources(data_cfg(sources=[("/a.jsonl", 0.0)]))
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.name='a b' is invalid"):
        resolve_sources(data_cfg(sources=[("/a.jsonl", 1.0, {"name": "a b"})]))
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.path is empty"):
        resolve_sources(data_cfg(sources=[("", 1.0)]))


def test_fingerprint_is_stats_not_bytes(tmp_path):
    path = write_docs(tmp_path / "a.jsonl", ["hello"], "jsonl")
    source = _one(path)
    before = source.fingerprint(*source.resolve())
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b"hello", b"HELLO"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source.fingerprint(*source.resolve()) == before
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert source.fingerprint(*source.resolve()) != before
    assert _one(path, text_field="body").fingerprint(*source.resolve()) != before
    assert json.loads(json.dumps(before)) == before
