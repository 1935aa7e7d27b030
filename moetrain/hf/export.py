"""Export a moetrain checkpoint as a Hugging Face folder that transformers loads.

    python -m moetrain.hf export RUN_OR_CHECKPOINT OUT_DIR [--family F] [--tokenizer PATH]
                                 [--dtype float32|bfloat16] [--max-shard-size 5GB]

writes OUT_DIR/ config.json (the family's `model_type`), model-0000k-of-0000n.safetensors with
model.safetensors.index.json, the tokenizer (tokenizer.json, tokenizer_config.json) and
generation_config.json. The folder is written next to OUT_DIR and renamed into place when
complete; nothing is written when the config, the tensors or the tokenizer do not fit. A config
the family cannot express is refused naming the key (moetrain/config/families.py); so is an
expert bias the family has no tensor for.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import CheckpointManager
from moetrain.checkpoint.convert import load_model_state, save_safetensors
from moetrain.config.families import FAMILIES, family_problems
from moetrain.config.schema import MoetrainConfig
from moetrain.hf.config import HFConfigError, require_transformers, to_hf_config
from moetrain.hf.tensors import to_hf_state
from moetrain.hf.tokenizer import write_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "olmoe": "OlmoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM"}


@dataclass
class ExportResult:
    out: Path
    family: str
    tensors: int
    parameters: int
    files: list[str]


def run_config(checkpoint: Path) -> MoetrainConfig:
    """The config of the run a checkpoint belongs to (`<run>/config.yaml`)."""
    path = checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise HFConfigError(f"{checkpoint}: the run's config {path} is missing (export needs the "
                            "model config the checkpoint was trained with)")
    merged = OmegaConf.merge(OmegaConf.structured(MoetrainConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, scale in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def check_exportable(model_cfg: Any, state: dict[str, torch.Tensor]) -> None:
    """Refuse what the family cannot express: config keys, and a non-zero expert bias in a
    family without one (HFConfigError naming the key)."""
    family = str(model_cfg.family)
    if family == "custom":
        raise HFConfigError("model.family=custom: name the Hugging Face family the model is "
                            f"(--family {'|'.join(FAMILIES)}); the export checks it can express it")
    problems = family_problems(model_cfg)
    if problems:
        raise HFConfigError("cannot export: " + "; ".join(f"{key} {why}" for key, why in problems))
    if family != "deepseek_v3":
        for name, t in state.items():
            if name.endswith("router.expert_bias") and bool(t.ne(0).any()):
                raise HFConfigError(
                    f"cannot export: {name} is non-zero (aux-loss-free balancing, "
                    f"model.moe.routing.bias_rate) and the {family} family has no expert bias")


def export(source: Path, out: Path, *, family: Optional[str] = None,
           tokenizer: Optional[Path] = None, dtype: str = "float32",
           max_shard_bytes: int = 5 * 10**9) -> ExportResult:
    """Export the checkpoint `source` (a run directory, checkpoints/ folder or step_<N>) to the
    Hugging Face folder `out` (module docstring)."""
    transformers = require_transformers()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFConfigError(f"{out} exists and is not empty; choose another output folder")
    checkpoint = CheckpointManager(source, None).resolve(str(source))
    if checkpoint is None:
        raise HFConfigError(f"{source}: no checkpoint there")
    cfg = run_config(checkpoint)
    if family is not None:
        cfg.model.family = family
    meta_file = checkpoint / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    given_tokenizer = tokenizer is not None
    tokenizer = tokenizer or (Path(meta["tokenizer"]) if meta.get("tokenizer") else None)
    if tokenizer is None or not tokenizer.exists():
        raise HFConfigError(f"{checkpoint}: no tokenizer recorded with the checkpoint "
                            f"({tokenizer or 'none'}); pass --tokenizer PATH (a sentencepiece "
                            ".model, a tokenizer.json or a Hugging Face folder)")
    run_tokenizer = (meta.get("identity") or {}).get("tokenizer") or {}
    special = {} if given_tokenizer else {"bos_id": run_tokenizer.get("bos_id"),
                                          "eos_id": run_tokenizer.get("eos_id")}
    state = load_model_state(checkpoint)
    check_exportable(cfg.model, state)
    top_k = trained_top_k(cfg, meta)
    hf_state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() and "e_score_correction_bias"
                not in k else v for k, v in to_hf_state(state, cfg.model).items()}

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)  # mode from the umask, like every file written below
    try:
        bos, eos, pad = write_tokenizer(tokenizer, tmp, **special)
        hf_cfg = to_hf_config(cfg.model, top_k=top_k, bos_token_id=bos, eos_token_id=eos,
                              pad_token_id=pad, dtype=dtype)
        hf_cfg.architectures = [ARCHITECTURES[str(cfg.model.family)]]
        hf_cfg.save_pretrained(str(tmp))
        transformers.GenerationConfig(bos_token_id=bos, eos_token_id=eos,
                                      pad_token_id=pad).save_pretrained(str(tmp))
        files = _write_safetensors(hf_state, tmp, max_shard_bytes)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, str(cfg.model.family), len(hf_state),
                        sum(t.numel() for t in hf_state.values()), files)


def trained_top_k(cfg: MoetrainConfig, meta: dict) -> int:
    """The top-k the checkpoint's weights were trained with at their last step: recorded at save
    time (meta.json `routing`); for checkpoints without it, the schedule's value at the step
    before the checkpoint's (step N holds the weights after the optimizer step N - 1)."""
    recorded = (meta.get("routing") or {}).get("top_k")
    if recorded is not None:
        return int(recorded)
    from moetrain.model.moe.schedule import top_k_at

    return top_k_at(cfg.model.moe, max(int(meta.get("step") or 0) - 1, 0))


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int) -> list[str]:
    shards = _shards(tensors, max_bytes)
    n = len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_safetensors(shard, out / name)
        weight_map.update({k: name for k in shard})
        files.append(name)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


__all__ = ["ExportResult", "check_exportable", "export", "parse_size", "run_config",
           "trained_top_k"]
