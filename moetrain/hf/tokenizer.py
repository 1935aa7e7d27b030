"""Tokenizers in Hugging Face form: moetrain's sentencepiece model converted, or an HF folder's
tokenizer copied (export), and an HF folder's tokenizer read for the data (import).

The conversion is transformers' own (`SpmConverter.build_tokenizer_from_spm_proto`, which
follows the sentencepiece model's normaliser, dummy-prefix, byte-fallback and merge settings),
so the exported `tokenizer.json` encodes every text to the ids sentencepiece gives
(tests/hf/test_cli.py, `test_the_converted_tokenizer_encodes_the_corpus_as_sentencepiece`,
checks it on the corpus).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from moetrain.hf.config import HFConfigError

#: The files of a Hugging Face tokenizer folder (those present are copied).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "chat_template.jinja")


def sentencepiece_to_hf(model_file: str | Path, out_dir: str | Path) -> tuple[Optional[int], Optional[int]]:
    """Write `model_file` (a sentencepiece .model) into `out_dir` as an HF fast tokenizer
    (tokenizer.json + tokenizer_config.json); returns its (bos_id, eos_id)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(str(model_file)).proto
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    spec = proto.trainer_spec

    def piece(i: int) -> Optional[str]:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=piece(spec.bos_id),
                                  eos_token=piece(spec.eos_id), unk_token=piece(spec.unk_id),
                                  pad_token=piece(spec.pad_id))
    tok.save_pretrained(str(out_dir))
    return (spec.bos_id if spec.bos_id >= 0 else None, spec.eos_id if spec.eos_id >= 0 else None)


def copy_hf_tokenizer(src_dir: str | Path, out_dir: str | Path) -> tuple[Optional[int], Optional[int]]:
    """Copy the tokenizer files of an HF folder; returns its (bos_id, eos_id)."""
    src_dir = Path(src_dir)
    if not (src_dir / "tokenizer.json").is_file():
        raise HFConfigError(f"{src_dir} has no tokenizer.json")
    for name in HF_TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, Path(out_dir) / name)
    tok = load_hf_tokenizer(src_dir)
    return tok.bos_token_id, tok.eos_token_id


def load_hf_tokenizer(path: str | Path):
    """The fast tokenizer of a local HF folder (never the hub)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise HFConfigError(f"{path}: cannot load its tokenizer: {str(err).splitlines()[0]}") from None


def write_tokenizer(source: str | Path, out_dir: str | Path) -> tuple[Optional[int], Optional[int]]:
    """A sentencepiece .model file, a tokenizer.json file or an HF folder -> HF tokenizer files
    in `out_dir`; returns (bos_id, eos_id)."""
    source = Path(source)
    if source.name == "tokenizer.json" and (source.parent / "tokenizer_config.json").is_file():
        source = source.parent  # the HF folder it belongs to: its configs name the special tokens
    if source.is_dir():
        return copy_hf_tokenizer(source, out_dir)
    if source.suffix == ".model":
        return sentencepiece_to_hf(source, out_dir)
    if source.name.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(source)).save_pretrained(str(out_dir))
        return None, None
    raise HFConfigError(f"tokenizer {source}: expected a sentencepiece .model, a tokenizer.json "
                        "or a Hugging Face folder")


__all__ = ["copy_hf_tokenizer", "load_hf_tokenizer", "sentencepiece_to_hf", "write_tokenizer"]
