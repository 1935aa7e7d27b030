"""Load a Hugging Face checkpoint into a moetrain model in any layout, reading only each rank's
slices (`model.init.from_hf`), and read a dense one whole (upcycling).

The model is the already-parallelised one (EP/ETP slices, TP/SP, FSDP2 shards, this rank's
pipeline stages), or one whose shards were just allocated (meta-device construction): every
parameter says which region of the full tensor it holds (a DTensor's mesh and placements, else
all of it), and exactly that region is read with `safetensors.safe_open(...).get_slice`, so a
rank never materialises a tensor it does not own. The Hugging Face folder is checked against
the config first: every tensor the family's model has must be there with its shape, and
nothing else (a checkpoint of another shape or family is refused, naming the tensor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
# The offsets of a DTensor's local shard in its global tensor, strided FSDP2 x TP shards
# included; private but the function DCP itself plans reads and writes with (torch >= 2.4).
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moetrain.hf.config import (
    HFConfigError, check_matches, dense_overrides, differences, load_hf_config, model_config_from,
)
from moetrain.hf.tensors import Source, hf_names, read_slice, shared_copies, tensor_map

_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


class HFCheckpointError(HFConfigError):
    """The Hugging Face tensors do not fit the model; the message names the tensor and folder."""


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (`model.safetensors` or an index of shards); each
    file is opened (memory-mapped) on first use."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path, self._open, self._handles = Path(path), safe_open, {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise HFCheckpointError(f"{self.path} has no model.safetensors nor "
                                    "model.safetensors.index.json")

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._handles:
            if not (self.path / fname).is_file():
                raise HFCheckpointError(f"{self.path}: shard {fname} (holding {name}) is missing")
            self._handles[fname] = self._open(str(self.path / fname), "pt")
        return self._handles[fname]

    def get_slice(self, name: str):
        return self._file(name).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)


def _canonical(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_NAMES)


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each once, by canonical name."""
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        items = list(mod.named_parameters(recurse=False)) + [
            (n, b) for n, b in mod.named_buffers(recurse=False)
            if n not in mod._non_persistent_buffers_set]
        for n, t in items:
            if id(t) not in seen:
                seen.add(id(t))
                yield _canonical(f"{mod_name}.{n}" if mod_name else n), t


def _ignorable(name: str, model_cfg: Any, have: set[str]) -> bool:
    """DeepSeek-V3's multi-token-prediction layers the model does not train (a layer
    model.layers.<n> with an `eh_proj`, n >= n_layers + model.mtp.depth: a run with fewer MTP
    modules starts from the rest) and rotary tables."""
    parts = name.split(".")
    if name.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
        n = int(parts[2])
        return (n >= model_cfg.n_layers + model_cfg.mtp.depth
                and f"model.layers.{n}.eh_proj.weight" in have)
    return name.endswith("rotary_emb.inv_freq")


def check_folder(files: SafetensorsFolder, model_cfg: Any, family: Optional[str] = None,
                 key: str = "model.init.from_hf") -> None:
    """Every tensor of the family's model present, none unknown, shapes as the config says."""
    want = hf_names(model_cfg, family)
    have = set(files.weight_map)
    missing = sorted(want - have)
    extra = sorted(n for n in have - want if not _ignorable(n, model_cfg, have))
    if missing:
        raise HFCheckpointError(f"{key}={str(files.path)!r} has no tensor {missing[0]!r}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                                "not a checkpoint of this model config")
    if extra:
        raise HFCheckpointError(f"{key}={str(files.path)!r} holds {extra[0]!r}, which this model "
                                "config does not have: not a checkpoint of this model config")


def _expected_hf_shape(src: Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    if src.kind == "same":
        return shape
    if src.kind == "rows":
        return (src.hf_rows, *shape[1:])
    return (shape[2], shape[1])


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path, model_cfg: Any,
                    family: Optional[str] = None, key: str = "model.init.from_hf") -> int:
    """Copy this rank's part of every parameter (and persistent buffer) of `model` from the
    Hugging Face folder `path`; returns the number of tensors filled. Routers' expert biases of
    families without one are zeroed."""
    files = SafetensorsFolder(path)
    check_folder(files, model_cfg, family, key)
    sources = tensor_map(model_cfg, family)
    filled = 0
    for name, tensor in _tensors(model):
        src = sources.get(name)
        if src is None:
            if name.endswith("router.expert_bias"):
                (tensor.to_local() if isinstance(tensor, DTensor) else tensor).zero_()
                continue
            raise HFCheckpointError(f"the model's {name!r} has no Hugging Face tensor")
        global_shape = tuple(tensor.shape)
        hf = src.hf.format(e=0)
        if files.shape(hf) != _expected_hf_shape(src, global_shape):
            raise HFCheckpointError(f"{key}={str(path)!r}: {hf} has shape {list(files.shape(hf))}, "
                                    f"the model config expects "
                                    f"{list(_expected_hf_shape(src, global_shape))}")
        if isinstance(tensor, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                global_shape, tensor.device_mesh, tensor.placements)
            local = tensor.to_local()
        else:
            shape, offset, local = global_shape, (0,) * len(global_shape), tensor
        if local.numel():
            local.copy_(read_slice(src, files, tuple(offset), tuple(shape)).to(local.dtype))
            _check_copies(files, model_cfg, name, src, tuple(offset), tuple(shape), key)
        filled += 1
    return filled


def _check_copies(files: SafetensorsFolder, model_cfg: Any, name: str, src: Source,
                  offset: tuple[int, ...], shape: tuple[int, ...], key: str) -> None:
    """The MTP layers' copies of the shared embedding / head (this rank's region of them) equal
    the main tensor: moetrain holds one of each, so a checkpoint whose copies differ is not a
    model it can represent."""
    for hf, ours in shared_copies(model_cfg).items():
        if ours != name:
            continue
        main = read_slice(src, files, offset, shape)
        copy = read_slice(Source("same", hf), files, offset, shape)
        if not torch.equal(main, copy):
            raise HFCheckpointError(
                f"{key}={str(files.path)!r}: {hf} differs from {src.hf}; moetrain's MTP modules "
                "share the main model's embedding and output head (DeepSeek-V3's are copies)")


def read_dense_state(path: str | Path, dense_cfg: Any, family: str) -> dict[str, torch.Tensor]:
    """The full state (moetrain names) of a dense Llama / Qwen3 checkpoint, for upcycling;
    `dense_cfg` is the MoE config's trunk with every layer dense."""
    files = SafetensorsFolder(path)
    check_folder(files, dense_cfg, family, "model.init.upcycle_from")
    state = {}
    for name, src in tensor_map(dense_cfg, family).items():
        state[name] = files.get(src.hf) if src.kind == "same" else read_slice(
            src, files, (0,) * 2, files.shape(src.hf))
    return state


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def dense_config(model_cfg: Any, path: str | Path) -> tuple[Any, str]:
    """(the MoE config's trunk as a dense model of the HF folder's MLP width, its family);
    HFConfigError naming every trunk key that differs from the dense checkpoint's."""
    hf = load_hf_config(path)
    wanted = dense_overrides(hf)
    diffs = differences(model_cfg, wanted)
    if diffs:
        listed = "; ".join(f"{k}={have!r} but the dense checkpoint has {want!r}"
                           for k, have, want in diffs)
        raise HFConfigError(f"model.init.upcycle_from={str(path)!r}: the MoE trunk differs from "
                            f"the dense {hf.model_type} checkpoint: {listed}")
    dense = model_config_from({"model.moe.first_dense_layers": model_cfg.n_layers,
                               "model.ffn_hidden": int(hf.intermediate_size),
                               "model.mtp.depth": 0}, model_cfg)
    return dense, hf.model_type


def check_init(cfg: Any) -> None:
    """Before any process group or run directory: the source of the initial weights
    (model.init.from_hf, model.init.upcycle_from) exists and, when a Hugging Face folder, fits
    the model config (config and tensor names/shapes); ConfigError naming the keys otherwise."""
    init = cfg.model.init
    if init.from_hf:
        check_matches(cfg.model, init.from_hf)
        check_folder(SafetensorsFolder(init.from_hf), cfg.model)
    if init.upcycle_from and is_hf_folder(init.upcycle_from):
        dense, family = dense_config(cfg.model, init.upcycle_from)
        check_folder(SafetensorsFolder(init.upcycle_from), dense, family, "model.init.upcycle_from")
    elif init.upcycle_from:
        from moetrain.checkpoint import CheckpointError, CheckpointManager

        try:
            CheckpointManager(init.upcycle_from, None).resolve(init.upcycle_from)
        except CheckpointError as err:
            raise HFConfigError(
                f"model.init.upcycle_from={init.upcycle_from!r} is neither a dense moetrain "
                "checkpoint (a step_<N> folder, checkpoints/ folder or run directory) nor a "
                f"Hugging Face folder (config.json): {str(err).split(': ', 2)[-1]}") from None


def use_hf_tokenizer(cfg: Any) -> None:
    """Point `data.tokenizer.path` at the imported model's tokenizer (model.init.from_hf, or a
    dense HF model to upcycle), unless the config names one: continued pretraining needs no new
    vocabulary. A configured tokenizer other than the folder's, or none where the folder has
    none, is refused (HFConfigError) unless model.init.allow_other_tokenizer. Idempotent."""
    from moetrain.hf.tokenizer import check_same_tokenizer

    folder = hf_tokenizer_folder(cfg)
    if folder is not None and cfg.data.tokenizer.path is None:
        cfg.data.tokenizer.path = str(folder)
    check_same_tokenizer(cfg, folder)


def hf_tokenizer_folder(cfg: Any) -> Optional[Path]:
    """The HF folder whose tokenizer the data uses: the imported model's, if it has one
    (tokenizer.json, or a sentencepiece tokenizer.model)."""
    init = cfg.model.init
    for path in (init.from_hf, init.upcycle_from):
        if path and is_hf_folder(path) and any(
                (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            return Path(path)
    return None


__all__ = ["HFCheckpointError", "check_init", "dense_config", "hf_tokenizer_folder", "use_hf_tokenizer",
           "is_hf_folder", "SafetensorsFolder", "check_folder", "load_hf_weights",
           "read_dense_state"]
