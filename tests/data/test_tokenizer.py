import pytest

from moetrain.data.tokenizer import Tokenizer

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
    assert Tokenizer(tok.model_file).encode(text) == tok.encode(text)


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
    with pytest.raises(ValueError, match="model.vocab_size"):
        Tokenizer.train(["some text"] * 10, tmp_path / "x.model", 100)


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
