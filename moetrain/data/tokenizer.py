"""A sentencepiece BPE tokenizer trained on the local corpus (never fetched from a hub).

Training settings are chosen so that the same corpus always gives the same model file and so
that any text round-trips: identity normalisation (no NFKC, whitespace kept as written), no dummy
prefix, and byte fallback for characters outside the vocabulary. Newlines are not part of the
training sentences (sentencepiece trains on lines), so "\\n" encodes as the byte piece <0x0A>.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

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


class Tokenizer:
    """Thin wrapper over a sentencepiece model file."""

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_file}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))

    @classmethod
    def train(cls, lines: Iterable[str], model_file: str | Path, vocab_size: int) -> "Tokenizer":
        """Train a BPE model on `lines` (one sentence each, without newlines) and write it."""
        buf = io.BytesIO()
        try:
            # model_writer + sentence_iterator: the model records no file paths, so it is
            # byte-identical wherever it is trained.
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, **_TRAINER_ARGS
            )
        except RuntimeError as e:
            raise ValueError(
                f"training a {vocab_size}-piece BPE tokenizer failed ({e}); the vocabulary must hold "
                "259 byte/special pieces plus the corpus characters, and the corpus must be large "
                "enough for the requested number of merges (model.vocab_size)"
            ) from e
        with open(model_file, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        return cls(model_file)

    @classmethod
    def from_prepared(cls, prepared_dir: str | Path) -> "Tokenizer | HFTokenizer":
        """The tokenizer of a prepared dataset directory (see moetrain.data.prepare)."""
        from moetrain.data.prepare import load_index

        path = Path(prepared_dir) / load_index(prepared_dir)["tokenizer"]
        return HFTokenizer(path.parent) if path.name == HF_TOKENIZER_FILE else cls(path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


HF_TOKENIZER_FILE = "tokenizer.json"


class HFTokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json and its config), loaded
    with transformers so BOS/EOS are the model's; the same interface as `Tokenizer`. The
    tokenizer of a model imported with model.init.from_hf / upcycle_from (moetrain/hf)."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.model_file = self.folder / HF_TOKENIZER_FILE
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {self.model_file}")
        self._tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return self._tok.eos_token_id

    @property
    def bos_id(self) -> int:
        return self._tok.bos_token_id if self._tok.bos_token_id is not None else -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])
