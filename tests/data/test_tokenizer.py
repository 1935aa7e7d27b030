import json

import pytest

from moetrain.data import DataError
from moetrain.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

TINY_VOCAB = 384


@pytest.fixture(scope="module")
def tok(tiny_corpus, tmp_path_factory):
    lines = [line for f in sorted(tiny_corpus.glob("*.txt")) for line in f.read_text().split("\n")]
    return Tokenizer.train(lines, tmp_path_factory.mktemp("tok") / "t.model", TINY_VOCAB)


@pytest.mark.parametrize("text", [
    "To be, or not to be: that is the question.\n",
    "Ham.\nWhat's the matter now?\n\n  [Exit Ghost.]  \n",
    "  leading and  double  spaces,\ttabs\r\nand CRLF",
    "numbers 12345 and 3.14159",
    "unseen characters: Café, naïve, — 東京 🙂 \x00\x7f",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_properties(tok, tiny_corpus, tmp_path):
    assert tok.vocab_size == TINY_VOCAB
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    # Learned merges compress ordinary text well below one token per character, even with ~60 merges.
    text = (tiny_corpus / "hamlet.txt").read_text()
    assert len(tok.encode(text)) < 0.8 * len(text)
    # Reloading from the file gives the same tokenizer.
    assert Tokenizer.load(tok.model_file).encode(text) == tok.encode(text)


def test_training_is_deterministic(tok, tiny_corpus, tmp_path):
    lines = [line for f in sorted(tiny_corpus.glob("*.txt")) for line in f.read_text().split("\n")]
    again = Tokenizer.train(lines, tmp_path / "again.model", TINY_VOCAB)
    assert again.model_file.read_bytes() == tok.model_file.read_bytes()


def test_training_settings_do_not_depend_on_the_machine():
    # The BPE result depends on the trainer's thread count (measured: 1 vs 2 threads differ).
    from moetrain.data.tokenizer import _TRAINER_ARGS

    assert _TRAINER_ARGS["num_threads"] == 1 and _TRAINER_ARGS["shuffle_input_sentence"] is False
    assert _TRAINER_ARGS["input_sentence_size"] == 0


def test_too_small_vocab_is_refused(tiny_corpus, tmp_path):
    with pytest.raises(DataError, match="model.vocab_size"):
        Tokenizer.train(["some text"] * 10, tmp_path / "x.model", 100)


def test_missing_or_unknown_files(tmp_path):
    with pytest.raises(DataError, match=r"data\.tokenizer\.path=.*nope\.model.*no such file"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"unknown tokenizer format '\.txt'"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer.load(tmp_path / "broken.model")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path / "broken.json")
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("text", ["To be, or not to be:\n that is\tthe question. 12345",
                                  "Café — naïve 東京 🙂", ""])
def test_existing_tokenizers_of_both_kinds(tok, hf_tokenizer_json, text):
    spm = Tokenizer.load(tok.model_file)
    assert isinstance(spm, SentencePieceTokenizer) and spm.kind == "sentencepiece"
    assert (spm.vocab_size, spm.bos_id, spm.eos_id) == (TINY_VOCAB, 1, 2)
    assert spm.encode(text) == tok.encode(text) and spm.decode(spm.encode(text)) == text
    hf = Tokenizer.load(hf_tokenizer_json)
    assert isinstance(hf, HFTokenizer) and hf.kind == "tokenizers"
    assert hf.vocab_size == 300 and hf.eos_id == 0 and hf.bos_id is None  # <|endoftext|> is token 0
    ids = hf.encode(text)
    assert all(0 <= i < 300 for i in ids) and hf.decode(ids) == text
    assert hf.encode_batch([text, "a b"]) == [ids, hf.encode("a b")]
    assert hf.eos_id not in ids  # no special tokens added: documents are separated by EOS only
    assert Tokenizer.load(hf_tokenizer_json.parent).model_file == hf_tokenizer_json  # a folder


def test_eos_from_tokenizer_config_or_the_config_key(hf_tokenizer_json, tmp_path, tok):
    from tokenizers import Tokenizer as Raw

    raw = Raw.from_file(str(hf_tokenizer_json))
    raw.add_special_tokens(["<s>", "<end>"])
    d = tmp_path / "model"
    d.mkdir()
    raw.save(str(d / "tokenizer.json"))
    # Found by name: <|endoftext|> is among the usual names.
    assert Tokenizer.load(d / "tokenizer.json").eos_id == 0
    # tokenizer_config.json next to it names the EOS (and BOS) token, as HF model folders do.
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}, "bos_token": "<s>"}))
    t = Tokenizer.load(d / "tokenizer.json")
    assert (t.eos_id, t.bos_id) == (raw.token_to_id("<end>"), raw.token_to_id("<s>"))
    # data.tokenizer.eos_token wins, and must exist.
    assert Tokenizer.load(d / "tokenizer.json", eos_token="<s>").eos_id == raw.token_to_id("<s>")
    with pytest.raises(DataError, match=r"data\.tokenizer\.eos_token='</eos>' is not a token"):
        Tokenizer.load(d / "tokenizer.json", eos_token="</eos>")
    assert Tokenizer.load(tok.model_file, eos_token="<s>").eos_id == 1
    with pytest.raises(DataError, match=r"data\.tokenizer\.eos_token='<nope>' is not a piece"):
        Tokenizer.load(tok.model_file, eos_token="<nope>")


def test_a_tokenizer_json_without_an_eos_token_is_refused(tmp_path):
    from tokenizers import Tokenizer as Raw, models

    Raw(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"no end-of-text token found.*data\.tokenizer\.eos_token"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_a_sentencepiece_model_of_another_kind(tmp_path):
    # A unigram model trained by sentencepiece itself, with its own special-piece ids.
    import sentencepiece as spm

    lines = ["the quick brown fox jumps over the lazy dog"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "u"),
                                   vocab_size=30, model_type="unigram", bos_id=-1, eos_id=3, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    t = Tokenizer.load(tmp_path / "u.model")
    assert (t.vocab_size, t.bos_id, t.eos_id) == (30, None, 3)
    assert t.decode(t.encode("the lazy fox")) == "the lazy fox"
