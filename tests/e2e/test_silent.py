"""Nothing silent (issue 22): each way a user could train on data, a tokenizer, a model or a
directory other than the one named is refused as a user would meet it, from the command line:
one line, exit code 2, nothing written. And a clean Ctrl-C under the README's launcher is a
checkpoint and exit 0.

- a typo'd glob whose source name the shared default cache already holds;
- `checkpoint.resume=PATH` of another family whose shapes all agree, under
  `python -m moetrain.torchrun` (the README's multi-process launcher);
- `model.init.from_hf` with another `data.tokenizer.path`;
- a second launch on the run directory of a live run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.data.conftest import SHIPPED, write_docs
from tests.harness import TINY, run_train, start_train, tiny_config, torchrun, trainer_for

pytestmark = pytest.mark.slow

FAST = (*TINY, "train.global_batch_size=4")
LAUNCHER = torchrun(2, relay=True)  # the README's multi-process launcher: moetrain.torchrun


def refused(*overrides: str, launcher=()) -> str:
    """The one line a refused start prints (asserting exit 2 and nothing else on the console)."""
    proc = run_train(overrides, launcher=launcher, base=FAST, timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and not proc.stdout, proc.stderr
    return lines[0]


def tree(path: Path) -> dict[str, int]:
    """Every file below `path` with its modification time (what a refused start must not touch)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE tokenizer.json (a user's own tokenizer), built here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (SHIPPED / "hamlet.txt").read_text().split("\n\n")
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def test_a_typod_glob_never_trains_on_the_cached_source_of_that_name(tmp_path, bpe_json):
    from moetrain.data import ensure_prepared

    # An earlier run prepared its source "web<random>" into the shared default cache
    # ($MOETRAIN_CACHE/tok-<sha of the tokenizer>), as every run with this tokenizer does. (A
    # name of its own: $MOETRAIN_TEST_CACHE keeps the cache across test sessions.)
    name = f"web{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    plays = (SHIPPED / "macbeth.txt").read_text().split("\n\n")
    write_docs(folder / "part-000.jsonl.zst", plays, "jsonl.zst")
    cfg = tiny_config([f"data.sources=[{{path: '{folder}/*.jsonl.zst'}}]",
                       f"data.tokenizer.path={bpe_json}", "model.vocab_size=512"], base=FAST)
    cache = ensure_prepared(cfg.data, cfg.model.vocab_size)
    assert cache.parent == Path(os.environ["MOETRAIN_CACHE"]).absolute()
    before = tree(cache)
    run = tmp_path / "run"
    typo = f"{folder}/*.jsonl.zstd"  # the same source name; no file matches
    line = refused(f"data.sources=[{{path: '{typo}'}}]", f"data.tokenizer.path={bpe_json}",
                   "model.vocab_size=512", f"run.dir={run}")
    assert line.startswith(f"error: data.sources[0].path='{typo}' (which matches no file), but the "
                           f"prepared directory {cache} holds the source named '{name}' made "
                           f"from '{folder}/*.jsonl.zst'"), line
    assert not run.exists() and tree(cache) == before


def test_another_familys_checkpoint_with_equal_shapes_is_refused_under_the_launcher(tmp_path):
    # An OLMoE-style run's checkpoint: q/k norms, top-k weights not renormalised; every tensor
    # of the plain tiny model (no dense first layer) is in it with the same shape.
    olmoe = ["model.family=olmoe", "model.qk_norm=full", "model.moe.norm_topk_prob=false",
             "model.moe.first_dense_layers=0", f"run.dir={tmp_path / 'olmoe'}"]
    checkpoint = trainer_for(tiny_config(olmoe, base=FAST), tmp_path / "olmoe").save_checkpoint()
    run = tmp_path / "run"
    line = refused("model.moe.first_dense_layers=0", f"checkpoint.resume={checkpoint}",
                   f"run.dir={run}", launcher=LAUNCHER)
    assert line.startswith(f"error: checkpoint {checkpoint} was trained as another model than "
                           "this run's: model.family is 'olmoe' there, 'custom' here; "), line
    assert "model.qk_norm is 'full' there, 'none' here" in line
    assert "model.moe.norm_topk_prob is false there, true here" in line
    assert not run.exists()


def test_a_hugging_face_model_with_another_tokenizer_is_refused(tmp_path, bpe_json):
    from moetrain.config.schema import DataConfig
    from moetrain.data import ensure_prepared
    from moetrain.data.index import tokenizer_source
    from moetrain.hf.config import format_overrides, hf_overrides, load_hf_config
    from moetrain.hf.tokenizer import sentencepiece_to_hf
    from tests.hf.families import VOCAB, save_hf

    hf = tmp_path / "olmoe-hf"
    save_hf("olmoe", hf)
    sentencepiece_to_hf(tokenizer_source(ensure_prepared(DataConfig(), VOCAB)), hf)
    overrides = format_overrides(hf_overrides(load_hf_config(hf))).splitlines()
    run = tmp_path / "run"
    # e.g. configs/data/mixture_example.yaml's tokenizer left in place
    line = refused(*overrides, f"model.init.from_hf={hf}", f"data.tokenizer.path={bpe_json}",
                   f"run.dir={run}")
    assert line.startswith(f"error: data.tokenizer.path='{bpe_json}' is not the tokenizer of "
                           f"model.init.from_hf='{hf}' ("), line
    assert "model.init.allow_other_tokenizer=true" in line and not run.exists()


def test_a_second_launch_on_a_live_run_is_refused_and_ctrl_c_saves_and_exits_0(tmp_path):
    run = tmp_path / "run"
    first = start_train([f"run.dir={run}", "train.max_steps=1000"], launcher=LAUNCHER, base=FAST,
                        stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
            time.sleep(0.1)
        holder = json.loads((run / "run.lock").read_text())
        config = (run / "config.yaml").read_text()
        line = refused(f"run.dir={run}", "train.max_steps=3")
        assert line.startswith(f"error: run.dir='{run}' is in use by another run (pid "
                               f"{holder['pid']} (launcher pid {first.pid}) on "), line
        assert (run / "config.yaml").read_text() == config
        assert sorted(p.name for p in (run / "logs").iterdir()) == ["rank0.log", "rank1.log"]
        first.send_signal(signal.SIGINT)  # Ctrl-C: the terminal signals the launcher alone
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    step = int((run / "preempted").read_text().split(":")[0].split()[1])
    assert (run / "preempted").read_text() == f"step {step}: received SIGINT\n"
    assert f"stopping at step {step}: received SIGINT; checkpoint saved" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))  # one writer
    assert (run / "run.lock").read_text() == ""  # released cleanly
