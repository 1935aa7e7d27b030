"""data.* in the config tree: typed choices refused by Hydra, values and relations by validate()."""

import pytest

from moetrain.config import ConfigError, compose, to_object, validate
from moetrain.config.schema import OnExhausted


def _validate(*overrides):
    validate(to_object(compose(["+experiment=tiny", *overrides])))


def test_defaults_are_the_shipped_corpus_and_a_trained_bpe():
    cfg = to_object(compose(["+experiment=tiny"]))
    d = cfg.data
    assert (d.corpus, d.sources, d.tokenizer.path, d.num_workers) == (None, [], None, None)
    assert d.on_exhausted == OnExhausted("repeat") == "repeat"


def test_sources_from_the_command_line():
    cfg = to_object(compose(["+experiment=tiny", "data.on_exhausted=stop",
                             "data.sources=[{path: '/d/web/*.jsonl.zst', weight: 0.7}, "
                             "{path: /d/code, weight: 0.3, text_field: content, name: code}]"]))
    (web, code) = cfg.data.sources
    assert (web.path, web.weight, web.text_field, web.name) == ("/d/web/*.jsonl.zst", 0.7, "text", None)
    assert (code.path, code.text_field, code.name) == ("/d/code", "content", "code")
    assert cfg.data.on_exhausted == "stop"
    validate(cfg)


def test_bad_choices_and_keys_are_refused_while_composing():
    with pytest.raises(ConfigError) as e:
        compose(["+experiment=tiny", "data.on_exhausted=wrap"])
    assert str(e.value).startswith("data.on_exhausted")
    with pytest.raises(ConfigError, match="wieght"):
        compose(["+experiment=tiny", "data.sources=[{path: /a.jsonl, wieght: 1}]"])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data.corpus=/a", "data.sources=[{path: /b.jsonl}]"], "data.corpus and data.sources are both set"),
    (["data.sources=[{path: /a.jsonl, weight: -1}]"], "data.sources[0].weight=-1.0 is invalid"),
    (["data.sources=[{path: /a/web.jsonl}, {path: /b/web.parquet}]"], "data.sources[1].name='web'"),
    (["data.sources=[{weight: 1}]"], "data.sources[0].path is empty"),
    (["data.num_workers=0"], "data.num_workers=0 is invalid"),
    (["data.tokenizer.vocab_size=9000"], "data.tokenizer.vocab_size=9000 is invalid: must be <= model.vocab_size=8192"),
    (["data.seq_len=1"], "data.seq_len=1"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        _validate(*overrides)
    assert needle in str(e.value)
