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
from typing import Any, Optional

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


def write_tokenizer(source: str | Path, out_dir: str | Path, bos_id: Optional[int] = None,
                    eos_id: Optional[int] = None) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """A sentencepiece .model file, a tokenizer.json file or an HF folder -> HF tokenizer files
    in `out_dir`; returns (bos_id, eos_id, pad_id). `bos_id` / `eos_id`: the run's (what its
    data was prepared with), written as the tokenizer's special tokens where its files name
    others or none (a bare tokenizer.json names none)."""
    source = Path(source)
    if source.name == "tokenizer.json" and (source.parent / "tokenizer_config.json").is_file():
        source = source.parent  # the HF folder it belongs to: its configs name the special tokens
    if source.is_dir():
        copy_hf_tokenizer(source, out_dir)
    elif source.suffix == ".model":
        sentencepiece_to_hf(source, out_dir)
    elif source.name.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(source)).save_pretrained(str(out_dir))
    else:
        raise HFConfigError(f"tokenizer {source}: expected a sentencepiece .model, a "
                            "tokenizer.json or a Hugging Face folder")
    tok = load_hf_tokenizer(out_dir)
    wanted = {"eos_token": eos_id, "bos_token": bos_id}
    changed = False
    for attr, token_id in wanted.items():
        if token_id is not None and getattr(tok, f"{attr}_id") != token_id:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(token_id)))
            changed = True
    if changed:  # rewrites tokenizer_config.json / special_tokens_map.json with them
        tok.save_pretrained(str(out_dir))
    return tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def _init_source(cfg: Any) -> Optional[tuple[str, str]]:
    """(key, path) of the Hugging Face model a run starts from, if any."""
    init = cfg.model.init
    if init.from_hf:
        return "model.init.from_hf", str(init.from_hf)
    if init.upcycle_from and (Path(init.upcycle_from) / "config.json").is_file():
        return "model.init.upcycle_from", str(init.upcycle_from)
    return None


def check_same_tokenizer(cfg: Any, folder: Optional[Path]) -> None:
    """A run starting from a Hugging Face model trains on the ids of that model's tokenizer:
    `data.tokenizer.path` must be it (the same pieces at the same ids, the same end-of-text id),
    or the folder's own when it has one. HFConfigError naming both otherwise, unless
    `model.init.allow_other_tokenizer` says the difference is meant."""
    source = _init_source(cfg)
    if source is None or cfg.model.init.allow_other_tokenizer:
        return
    key, model_dir = source
    configured = cfg.data.tokenizer.path
    escape = "or set model.init.allow_other_tokenizer=true to train it on another vocabulary on purpose"
    if folder is None:
        if configured is None:
            raise HFConfigError(
                f"{key}={model_dir!r} has no tokenizer (tokenizer.json or tokenizer.model) and "
                "data.tokenizer.path is not set, so a new BPE would be trained for a model whose "
                f"embeddings belong to another vocabulary; name the model's tokenizer with "
                f"data.tokenizer.path, {escape}")
        return  # nothing to compare with: the configured one is taken as the model's
    from moetrain.data.tokenizer import Tokenizer

    eos = cfg.data.tokenizer.eos_token
    mine = Tokenizer.load(configured, eos)
    theirs = Tokenizer.load(folder, eos, key=key)
    if mine.model_file.read_bytes() == theirs.model_file.read_bytes():
        return
    a, b = mine.pieces(), theirs.pieces()
    differ = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    if differ == 0 and mine.eos_id == theirs.eos_id:
        return
    what = (f"{differ} of its {len(a)} token ids map to other text than in the model's "
            f"{len(b)}" if differ else f"its end-of-text id is {mine.eos_id}, the model's "
            f"{theirs.eos_id}")
    raise HFConfigError(
        f"data.tokenizer.path={str(configured)!r} is not the tokenizer of {key}={model_dir!r} "
        f"({what}): the model would continue on the ids of another vocabulary; remove "
        f"data.tokenizer.path to use {folder / theirs.model_file.name}, {escape}")


__all__ = ["check_same_tokenizer", "copy_hf_tokenizer", "load_hf_tokenizer",
           "sentencepiece_to_hf", "write_tokenizer"]
