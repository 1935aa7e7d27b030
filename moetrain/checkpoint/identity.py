"""What a checkpoint was trained as, and what a resume may change.

Shapes alone do not say which model the weights are: an OLMoE-style checkpoint (q/k norms,
unnormalised top-k weights) has every tensor of a plain model with the same shapes, and loading
it into one would silently drop its q/k norms and change its routing. So every checkpoint's
meta.json records, under `identity` (`checkpoint_identity`):

- `config`: the run's whole resolved config;
- `architecture`: the `model.*` keys whose change alters the function the weights compute (every
  `model.*` key except `RESUMABLE_MODEL_KEYS`), as dotted keys;
- `tokenizer`: the identity of the prepared data's tokenizer (sha256 of its file, kind,
  vocabulary size, EOS/BOS ids, where it came from).

`check_resume` refuses a checkpoint whose architecture or tokenizer differs from the run's,
naming every differing key with both values, and returns the other (legitimate) differences,
which the trainer logs. docs/checkpointing.md lists what may change on resume.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moetrain.checkpoint.manager import CheckpointError
from moetrain.data.index import read_index

log = logging.getLogger(__name__)

#: `model.*` keys (a key or a prefix ending in ".") that may differ on resume: where the first
#: weights came from, sparsification (top-k, capacity, token rounding, threshold routing and their
#: schedules), the routing losses and the bias update rate, MTP's loss weight and its schedule
#: (DeepSeek-V3 lowers it late in training), and how the experts' exchange and kernels run (the
#: sync-free budget and the overlap give the same results).
RESUMABLE_MODEL_KEYS = (
    "model.init.", "model.init_std", "model.max_position_embeddings", "model.moe.kernels",
    "model.moe.top_k", "model.moe.capacity_factor", "model.moe.pad_to_capacity",
    "model.moe.token_rounding", "model.moe.schedule.", "model.moe.routing.top_p",
    "model.moe.routing.min_k", "model.moe.routing.bias_rate", "model.moe.lbl.",
    "model.moe.z_loss_coeff", "model.moe.ep_budget", "model.moe.ep_overlap",
    "model.mtp.loss_scale", "model.mtp.loss_scale_schedule.",
)
#: Keys whose difference is expected on every resume and not worth a log line.
_NOT_LOGGED = ("checkpoint.resume",)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _plain(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True,  # type: ignore[return-value]
                                  enum_to_str=True)


def is_architecture(key: str) -> bool:
    return key.startswith("model.") and not any(
        key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_MODEL_KEYS)


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys of a plain (container) config, dotted."""
    return {k: v for k, v in flatten(config).items() if is_architecture(k)}


def tokenizer_identity(prepared_dir: str | Path) -> dict[str, Any]:
    """The tokenizer the prepared data was made with (its index's record)."""
    tok = read_index(prepared_dir)["tokenizer"]
    return {k: tok.get(k) for k in ("sha256", "kind", "vocab_size", "eos_id", "bos_id",
                                    "eos_token", "source", "file")}


def checkpoint_identity(cfg: Any, prepared_dir: str | Path) -> dict[str, Any]:
    """The `config`, `architecture` and `tokenizer` entries of a checkpoint's meta.json."""
    config = _plain(cfg)
    return {"config": config, "architecture": architecture(config),
            "tokenizer": tokenizer_identity(prepared_dir)}


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, type(None), bool)) else repr(value)


def check_resume(checkpoint: Path, cfg: Any, prepared_dir: str | Path) -> list[str]:
    """Refuse (CheckpointError) resuming `checkpoint` into a run of another architecture or
    tokenizer; returns the other differences as 'key: old -> new' lines (to log)."""
    meta_file = Path(checkpoint) / "meta.json"
    try:
        meta = json.loads(meta_file.read_text()).get("identity") or {}
    except (OSError, ValueError, AttributeError):
        meta = {}
    if "architecture" not in meta:
        log.warning("checkpoint %s records no architecture (saved by an older moetrain): its "
                    "model config cannot be compared with this run's", checkpoint)
        return []
    config = _plain(cfg)
    saved, mine = meta["architecture"], architecture(config)
    problems = [f"{k} is {_show(saved[k])} there, {_show(mine[k])} here"
                for k in sorted(saved.keys() & mine.keys()) if saved[k] != mine[k]]
    problems += [f"{k} is not recorded there (an older moetrain), {_show(mine[k])} here"
                 for k in sorted(mine.keys() - saved.keys())]
    tok, theirs = tokenizer_identity(prepared_dir), meta.get("tokenizer") or {}
    if theirs.get("sha256") and (tok["sha256"], tok["eos_id"]) != (theirs["sha256"], theirs["eos_id"]):
        problems.append(
            f"its tokenizer is {theirs.get('source') or theirs.get('file')} ({theirs.get('kind')}, "
            f"{theirs.get('vocab_size')} tokens, EOS id {theirs.get('eos_id')}, sha256 "
            f"{str(theirs.get('sha256'))[:12]}), the run's data uses {tok.get('source') or tok.get('file')} "
            f"({tok['kind']}, {tok['vocab_size']} tokens, EOS id {tok['eos_id']}, sha256 "
            f"{str(tok['sha256'])[:12]})")
    if problems:
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained as another model than this run's: "
            f"{'; '.join(problems)}. On resume only what does not change the function of the "
            "weights may differ (docs/checkpointing.md); set those keys back, or start the "
            "new model in another run.dir")
    before = flatten(meta.get("config") or {})
    now = flatten(config)
    return [f"{k}: {_show(before[k])} -> {_show(now[k])}" for k in sorted(before.keys() & now.keys())
            if before[k] != now[k] and k not in _NOT_LOGGED] + \
           [f"{k}: (not recorded) -> {_show(now[k])}" for k in sorted(now.keys() - before.keys())
            if before and not is_architecture(k)]


__all__ = ["RESUMABLE_MODEL_KEYS", "architecture", "check_resume", "checkpoint_identity",
           "flatten", "is_architecture", "tokenizer_identity"]
