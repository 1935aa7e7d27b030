"""Read a sharded checkpoint without a process group; inspect it; convert it for use elsewhere.

The Hugging Face layout (Qwen2/3-MoE-style names, every expert its own `nn.Linear` weight) and
the full name mapping are in docs/checkpointing.md. Every source tensor must be consumed by
exactly one rule and every expert of every layer must come out (converters that silently drop
expert weights are a known failure elsewhere); anything unmatched is an error naming the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
# The one DCP entry point that loads chosen keys into full tensors without a process group or
# a model to load into; it is private but stable since torch 2.4 and used by torch's own tools.
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from moetrain.checkpoint import integrity
from moetrain.checkpoint.manager import CheckpointError

_PLAIN = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.moe\.router\.weight", r"model.layers.\1.mlp.gate.weight"),
    # aux-loss-free balancing bias, under DeepSeek-V3's Hugging Face name
    (r"layers\.(\d+)\.moe\.router\.expert_bias", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"layers\.(\d+)\.moe\.shared_experts\.w1\.weight", r"model.layers.\1.mlp.shared_expert.gate_proj.weight"),
    (r"layers\.(\d+)\.moe\.shared_experts\.w3\.weight", r"model.layers.\1.mlp.shared_expert.up_proj.weight"),
    (r"layers\.(\d+)\.moe\.shared_experts\.w2\.weight", r"model.layers.\1.mlp.shared_expert.down_proj.weight"),
]
_EXPERTS = re.compile(r"layers\.(\d+)\.moe\.experts\.(w[132])")
_EXPERT_HF = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}


def _metadata(path: Path):
    """The DCP metadata, after every file was checked against its checksum (the metadata is a
    pickle: only load checkpoints from a trusted source)."""
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path} is not a checkpoint: {path / '.metadata'} is missing")
    verify(path, distributed=False)
    return FileSystemReader(str(path)).read_metadata()


def verify(path: Path, distributed: bool = True) -> None:
    try:
        integrity.verify(path, distributed=distributed)
    except integrity.IntegrityError as err:
        raise CheckpointError(f"checkpoint {path} fails verification: {err}") from None


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) tensors from a DCP checkpoint, keys without the `model.` prefix."""
    path = Path(path)
    keys = {k for k in _metadata(path).state_dict_metadata if k.startswith("model.")}
    try:
        loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    return {k[len("model."):]: v for k, v in _flatten(loaded).items()}


class ModelTensors(Mapping):
    """A checkpoint's model tensors by name (keys without `model.`), each read from disk when it
    is asked for: a reader holds one full tensor at a time, never the whole model. `shapes`
    comes from the metadata, without reading tensors. Raises CheckpointError for a path that
    is not a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._meta = {k[len("model."):]: v
                      for k, v in _metadata(self.path).state_dict_metadata.items()
                      if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
        self.shapes = {k: torch.Size(v.size) for k, v in self._meta.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        meta = self._meta[key]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        try:  # no_dist: each rank reads what it needs, without collectives
            dcp.load({f"model.{key}": tensor}, checkpoint_id=str(self.path), no_dist=True)
        except Exception as err:
            raise CheckpointError(f"cannot read {key} from checkpoint {self.path}: {err}") from err
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def inspect(path: Path) -> dict[str, Any]:
    """Step, layout, tensors (shape, dtype) and file sizes of a checkpoint, without loading tensors."""
    path = Path(path)
    md = _metadata(path)
    meta_file = path / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    tensors = {
        k[len("model."):]: {"shape": list(v.size), "dtype": str(v.properties.dtype).replace("torch.", "")}
        for k, v in sorted(md.state_dict_metadata.items())
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    experts = [t["shape"][0] for k, t in tensors.items() if _EXPERTS.fullmatch(k) and k.endswith("w1")]
    return {
        "path": str(path),
        "step": meta.get("step"),
        "consumed_tokens": meta.get("consumed_tokens"),
        "world_size": meta.get("world_size"),
        "parallel": meta.get("parallel"),
        # parameters and persistent buffers (e.g. the routers' expert biases)
        "model_numel": sum(_numel(t["shape"]) for t in tensors.values()),
        "moe_layers": len(experts),
        "experts_per_layer": sorted(set(experts)),
        "tensors": tensors,
        "files": files,
        "total_bytes": sum(files.values()),
        "checksums": integrity.ALGORITHM,  # every file verified by _metadata
    }


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file` (metadata format "pt"), leaving the file with the mode any
    new file gets under the umask: safetensors itself creates it 0600."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moetrain names -> Hugging Face names, experts unstacked into per-expert Linear weights."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _EXPERTS.fullmatch(key)
        if m:
            layer, which = m.groups()
            for e in range(tensor.shape[0]):
                name = f"model.layers.{layer}.mlp.experts.{e}.{_PROJ[which]}_proj.weight"
                out[name] = tensor[e].t().contiguous()
            continue
        for pattern, repl in _PLAIN:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            raise CheckpointError(f"no Hugging Face name for checkpoint tensor {key!r}")
    return out


def from_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf`: per-expert weights are stacked back; a missing expert is an error."""
    inverse = [(re.compile(_replacement_regex(p, r)), p) for p, r in _PLAIN]
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = _EXPERT_HF.fullmatch(name)
        if m:
            layer, e, proj = m.groups()
            which = {v: k for k, v in _PROJ.items()}[proj]
            experts.setdefault((layer, which), {})[int(e)] = tensor.t()
            continue
        for regex, pattern in inverse:
            mm = regex.fullmatch(name)
            if mm:
                out[_fill(pattern, mm.groups())] = tensor
                break
        else:
            raise CheckpointError(f"unknown Hugging Face tensor {name!r}")
    for (layer, which), by_index in sorted(experts.items()):
        n = max(by_index) + 1
        missing = sorted(set(range(n)) - set(by_index))
        if missing:
            raise CheckpointError(f"layer {layer}: {_PROJ[which]}_proj of experts {missing} is missing")
        out[f"layers.{layer}.moe.experts.{which}"] = torch.stack([by_index[e] for e in range(n)]).contiguous()
    return out


def _replacement_regex(pattern: str, repl: str) -> str:
    """Turn a replacement like r'model.layers.\\1.self_attn.\\2_proj.weight' into a regex."""
    groups = re.findall(r"\([^)]*\)", pattern)
    regex = re.escape(repl)
    for i, group in enumerate(groups, start=1):
        regex = regex.replace(re.escape(f"\\{i}"), group)
    return regex


def _fill(pattern: str, groups: tuple[str, ...]) -> str:
    """Write the moetrain name for `pattern` with its capture groups filled in."""
    out, it = pattern, iter(groups)
    out = re.sub(r"\([^)]*\)", lambda _: next(it), out)
    return out.replace("\\.", ".")
