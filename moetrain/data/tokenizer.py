"""Tokenizers from local files: a sentencepiece `.model` or a Hugging Face `tokenizer.json`, and
the sentencepiece BPE trained on the sources when no tokenizer is given (never fetched from a hub).

The trained BPE is chosen so that the same text always gives the same model file and any text
round-trips: identity normalisation (no NFKC, whitespace kept as written), no dummy prefix, and
byte fallback for characters outside the vocabulary. Newlines are not part of the training
sentences (sentencepiece trains on lines), so "\\n" encodes as the byte piece <0x0A>.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moetrain.data.errors import DataError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SENTENCEPIECE, HF = "sentencepiece", "tokenizers"

_TRAINER_ARGS = dict(
    model_type="bpe",
    byte_fallback=True,
    # Rare characters go to byte pieces instead of each taking a vocabulary slot.
    character_coverage=0.9995,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
    # Determinism: the BPE trainer's result depends on the thread count; use every sentence, in order.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
)

# End-of-document tokens of common tokenizer.json files, tried in order when neither the file's
# tokenizer_config.json nor data.tokenizer.eos_token names one.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """What preparation and tools use of a tokenizer: ids of text, text of ids, BOS/EOS ids.

    `encode_batch` is single-threaded: parallelism comes from the preparation's worker processes,
    so that `data.num_workers` is the number of cores used.
    """

    kind: str
    model_file: Path
    vocab_size: int
    bos_id: int | None
    eos_id: int
    eos_token: str | None = None  # as configured (data.tokenizer.eos_token); None = the file's

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """The text of every token id, in id order (to compare two vocabularies)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- construction
    @staticmethod
    def load(path: str | os.PathLike, eos_token: str | None = None, key: str = "data.tokenizer.path") -> "Tokenizer":
        """The tokenizer in `path`: a `.model` (sentencepiece), a `.json` (tokenizers), or a
        folder holding tokenizer.json or tokenizer.model. Raises DataError naming `key`."""
        p = Path(path).expanduser()
        if p.is_dir():
            found = [p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).is_file()]
            if not found:
                raise DataError(f"{key}={str(path)!r}: the folder holds neither tokenizer.json nor "
                                "tokenizer.model")
            p = found[0]
        if not p.is_file():
            raise DataError(f"{key}={str(path)!r}: no such file; give a sentencepiece .model or a "
                            "Hugging Face tokenizer.json")
        if p.suffix == ".model":
            return SentencePieceTokenizer(p, eos_token, key)
        if p.suffix == ".json":
            return HFTokenizer(p, eos_token, key)
        raise DataError(f"{key}={str(path)!r}: unknown tokenizer format {p.suffix!r}; give a "
                        "sentencepiece .model or a Hugging Face tokenizer.json")

    @staticmethod
    def train(lines: Iterable[str], model_file: str | os.PathLike, vocab_size: int) -> "SentencePieceTokenizer":
        """Train a sentencepiece BPE on `lines` (one sentence each, without newlines), write it to
        `model_file`. Raises DataError when the vocabulary cannot be built."""
        import sentencepiece as spm

        buf = io.BytesIO()
        failed: list[BaseException] = []

        def sentences() -> Iterator[str]:
            # sentencepiece turns an error of the iterator into its own RuntimeError: keep ours.
            try:
                yield from lines
            except BaseException as e:
                failed.append(e)
                raise

        try:
            # model_writer + sentence_iterator: the model records no file paths, so it is
            # byte-identical wherever it is trained.
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size, **_TRAINER_ARGS
            )
        except RuntimeError as e:
            if failed:
                raise failed[0] from None
            reason = " ".join(str(e).split())  # one line
            raise DataError(
                f"training a {vocab_size}-piece BPE tokenizer failed ({reason}); the vocabulary "
                "(data.tokenizer.vocab_size, else model.vocab_size) must hold 259 byte/special "
                "pieces plus the corpus characters, and the corpus must be large enough for the "
                "requested number of merges"
            ) from None
        with open(model_file, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        return SentencePieceTokenizer(Path(model_file))


class SentencePieceTokenizer(Tokenizer):
    kind = SENTENCEPIECE

    def __init__(self, model_file: str | os.PathLike, eos_token: str | None = None,
                 key: str = "data.tokenizer.path"):
        import sentencepiece as spm

        self.model_file, self.eos_token = Path(model_file), eos_token
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{key}={str(model_file)!r} is not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if eos_token is not None:
            eos = self._sp.piece_to_id(eos_token)
            if eos == self._sp.unk_id() and eos_token != self._sp.id_to_piece(eos):
                raise DataError(f"data.tokenizer.eos_token={eos_token!r} is not a piece of {model_file}")
        else:
            eos = self._sp.eos_id()
            if eos < 0:
                raise DataError(f"{key}={str(model_file)!r} defines no end-of-sentence piece; name the "
                                "token that ends a document with data.tokenizer.eos_token")
        self.eos_id = int(eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library (no special tokens added:
    documents are separated by EOS only)."""

    kind = HF

    def __init__(self, model_file: str | os.PathLike, eos_token: str | None = None,
                 key: str = "data.tokenizer.path"):
        # One thread per process: the preparation's workers are the parallelism (data.num_workers).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer as _Tokenizer

        self.model_file, self.eos_token = Path(model_file), eos_token
        try:
            self._tok = _Tokenizer.from_file(str(self.model_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"{key}={str(model_file)!r} is not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _special_tokens_config(self.model_file)
        names = [eos_token] if eos_token is not None else [config.get("eos_token"), *_EOS_NAMES]
        ids = [(n, self._tok.token_to_id(n)) for n in names if n]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            if eos_token is not None:
                raise DataError(f"data.tokenizer.eos_token={eos_token!r} is not a token of {model_file}")
            raise DataError(f"{key}={str(model_file)!r}: no end-of-text token found (tried "
                            f"{', '.join(_EOS_NAMES)}); name it with data.tokenizer.eos_token")
        self.eos_id = int(found[0][1])
        bos = config.get("bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self) -> list[str]:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        out = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for piece, i in vocab.items():
            out[i] = piece
        return out


def _special_tokens_config(model_file: Path) -> dict:
    """eos_token / bos_token from the tokenizer_config.json next to a tokenizer.json, if any."""
    f = model_file.parent / "tokenizer_config.json"
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("eos_token", "bos_token"):
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "</s>", ...} (AddedToken)
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
