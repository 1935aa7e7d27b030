"""Real data through the command line: a weighted jsonl.gz + parquet mixture with an existing
tokenizer.json, resumed bit-identically; a source running out; bad sources refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.conftest import SHIPPED, write_docs
from tests.e2e.test_cli import CLI, metrics, train
from tests.harness import TINY

pytestmark = pytest.mark.slow

SEQ = 128


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Two sources and a byte-level BPE tokenizer.json (300 tokens), built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("mixture")
    plays = [p for name in ("hamlet", "macbeth") for p in (SHIPPED / f"{name}.txt").read_text().split("\n\n")]
    web = write_docs(d / "web" / "part-000.jsonl.gz", plays[: len(plays) // 2], "jsonl.gz")
    write_docs(d / "web" / "part-001.jsonl.gz", plays[len(plays) // 2 :], "jsonl.gz")
    # A small source: 4-5 sequences, so it starts a new epoch within a few steps.
    sonnets = (SHIPPED / "sonnets.txt").read_text()[2000:3000].split("\n\n")
    code = write_docs(d / "sonnets.parquet", sonnets, "parquet")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(plays, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    args = [f"data.sources=[{{path: '{web.parent}/*.jsonl.gz', weight: 0.75}}, {{path: '{code}', weight: 0.25}}]",
            f"data.tokenizer.path={d / 'tokenizer.json'}", "model.vocab_size=512", "data.val_fraction=0",
            f"data.prepared_dir={d / 'prepared'}"]
    return d, args


def test_mixture_trains_resumes_bit_identically_and_logs_the_realised_mixture(mixture, tmp_path):
    d, args = mixture
    full, split = tmp_path / "full", tmp_path / "split"
    proc = train(*args, f"run.dir={full}", "train.max_steps=6")
    for source in ("web", "sonnets"):  # prepared on first use, saying so on the console and in the log
        assert f"tokenised {source}: " in proc.stderr
        assert f"tokenised {source}: " in (full / "logs" / "rank0.log").read_text()
    index = json.loads((d / "prepared" / "index.json").read_text())
    assert sorted(index["sources"]) == ["sonnets", "web"] and index["tokenizer"]["kind"] == "tokenizers"
    _says_what_it_read(d, full, proc.stderr, index)
    assert 4 <= index["sources"]["sonnets"]["tokens"] // SEQ <= 6  # one epoch within the run
    # Stopped after its first step by the wall-clock budget, then resumed mid-epoch.
    train(*args, f"run.dir={split}", "train.max_steps=6", "train.max_time=0.001")
    assert len(metrics(split)) < 6 and (split / "checkpoints" / "latest").exists()
    train(*args, f"run.dir={split}", "train.max_steps=6")
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "load_cv", "source_tokens/web"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    # Global batches of 4: 3 sequences of web and 1 of sonnets each step.
    for r in a:
        assert r["source_tokens/web"] == 3 * SEQ * r["step"] and r["source_tokens/sonnets"] == SEQ * r["step"]
        assert r["source_tokens/web"] + r["source_tokens/sonnets"] == r["tokens"]


def _says_what_it_read(d: Path, run: Path, console: str, index: dict) -> None:
    """The console names the prepared directory and each source with its files and token
    counts; config.yaml and the rank's log list every file read with its size (the sizes from
    the file system here, the token counts from the prepared token files)."""
    import re

    import numpy as np

    assert (f"data: {d / 'prepared'} (tokenizer tokenizer.json: a copy of {d / 'tokenizer.json'}; "
            "vocabulary 300, EOS id 0)") in console
    files = {"web": sorted((d / "web").glob("*.jsonl.gz")), "sonnets": [d / "sonnets.parquet"]}
    config, log = (run / "config.yaml").read_text(), (run / "logs" / "rank0.log").read_text()
    for name, weight, path in (("web", "0.75", f"{d / 'web'}/*.jsonl.gz"),
                               ("sonnets", "0.25", str(d / "sonnets.parquet"))):
        line = re.search(rf"source {name} \(weight {weight}\): {re.escape(path)}, text_field "
                         rf"text, (\d+) files?, [\d.]+ [KM]?B -> ([\d,]+) train \+ 0 validation "
                         rf"tokens", console)
        assert line, console
        entry = index["sources"][name]
        tokens = sum(f.stat().st_size for f in (d / "prepared" / entry["dir"]).glob("train_*.bin")
                     ) // np.dtype(index["dtype"]).itemsize
        assert int(line[1]) == len(files[name]) and int(line[2].replace(",", "")) == tokens > 0
        for f in files[name]:
            entry = f"{f.name}  {f.stat().st_size} bytes  modified "
            assert f"#     {entry}" in config and f"source {name} file {entry}" in log
    assert "# The data this run read" in config


def test_a_source_running_out_under_stop_ends_the_run_with_a_checkpoint(mixture, tmp_path):
    _, args = mixture
    run = tmp_path / "run"
    proc = train(*args, f"run.dir={run}", "train.max_steps=50", "data.on_exhausted=stop", "checkpoint.every=100")
    last = metrics(run)[-1]["step"]
    assert 3 <= last < 10
    assert f"stopping at step {last}: source 'sonnets' has no sequences left for step {last + 1}" in proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last}"


def _bad(tmp: Path, case: str) -> tuple[list[str], str, str]:
    """(overrides, key, path) of a bad source."""
    if case == "missing":
        path = tmp / "nope.jsonl"
        return [f"data.sources=[{{path: '{path}'}}]"], "data.sources[0].path", str(path)
    if case == "unknown format":
        path = tmp / "data.csv"
        path.write_text("text\nhello\n")
        return [f"data.corpus={path}"], "data.corpus", str(path)
    if case == "no text field":
        path = write_docs(tmp / "a.jsonl", [{"body": "hello"}], "jsonl")
        return [f"data.sources=[{{path: '{path}'}}]"], "data.sources[0].text_field='text'", str(path)
    if case == "non-string text":
        path = write_docs(tmp / "a.parquet", [{"text": "ok"}, {"text": "fine"}], "parquet")
        path = write_docs(tmp / "b.parquet", [{"text": 7}], "parquet")
        return [f"data.sources=[{{path: '{tmp}/*.parquet', weight: 2}}]"], "data.sources[0].text_field", str(path)
    assert case == "empty"
    path = tmp / "empty.jsonl.zst"
    path.write_bytes(b"")
    return [f"data.sources=[{{path: '{path}'}}]"], "data.sources[0].path", str(path)


@pytest.mark.parametrize("case", ["missing", "unknown format", "no text field", "non-string text", "empty"])
def test_bad_sources_are_refused_before_anything_is_written(tmp_path, case, capsys):
    # The entry point's run() in this process (the command line's path after Hydra composed the
    # config); test_a_bad_source_on_the_command_line runs one case as a real command.
    from moetrain.config import compose
    from moetrain.train import run as run_cli

    src = tmp_path / "src"
    src.mkdir()
    overrides, key, path = _bad(src, case)
    run, prepared = tmp_path / "out" / "run", tmp_path / "out" / "prepared"
    code = run_cli(compose([*TINY, *CLI, *overrides, f"run.dir={run}",
                            f"data.prepared_dir={prepared}", "model.vocab_size=384"]))
    assert code == 2
    err = capsys.readouterr().err
    *progress, last = err.splitlines()  # the preparation's progress lines, then the error
    assert last.startswith("error:") and key in last and path in last, err
    assert all(line.startswith(("preparing ", "training a ")) for line in progress), err
    assert not (tmp_path / "out").exists(), "no run directory, no .lock, no partial prepared directory"


def test_a_bad_source_on_the_command_line(tmp_path):
    overrides, key, path = _bad(tmp_path, "no text field")
    run = tmp_path / "out" / "run"
    proc = train(*overrides, f"run.dir={run}", f"data.prepared_dir={tmp_path / 'out' / 'prepared'}", check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and key in last and path in last and "its fields: body" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_model_smaller_than_the_tokenizer_is_refused(mixture, tmp_path):
    d, args = mixture
    proc = train(*args, f"run.dir={tmp_path / 'run'}", "model.vocab_size=256", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.vocab_size=256" in last and f"data.tokenizer.path={str(d / 'tokenizer.json')!r}" in last
    assert "300 tokens" in last and not (tmp_path / "run").exists()
