"""Layout-independent initialisation: each element's initial value is a function of (seed, the
parameter's canonical name, the element's global index), computed only where the element lives.

    init_parameters(model, cfg, seed)   initialise every parameter and buffer this rank holds
    local_shard(module, name, p)        this rank's elements of a parameter and where they sit
    counter_normal(seed, name, index)   the N(0, 1) value of global elements `index` of `name`

The values come from a counter-based generator: splitmix64 (Steele, Lea, Flood, "Fast
splittable pseudorandom number generators", OOPSLA 2014) of seed-and-name key + element index,
one 64-bit hash per element, whose two 24-bit halves make a Box-Muller normal. A rank computes
only the indices of its own shard (from DTensor placements), in chunks of `chunk_elements`
elements, so no rank ever builds a tensor it does not own, and
every layout (and one process) gets the same bits. Why it is exact: docs/initialisation.md.
Hand-written because torch's generators are sequential streams (a shard cannot start at its
offset without drawing the elements before it) and Philox offsets exist only on CUDA.

Rules (the same for every module, so new modules need none): a normalisation module's weight is
1 and its bias 0; any other bias is 0; a projection that writes into the residual stream (`wo`,
`w2`, the experts' w2) ~ N(0, init_std / sqrt(2 n_layers)); every other parameter ~ N(0,
init_std); every buffer is 0 (expert biases, step statistics).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.norm import RMSNorm

# Wrappers (activation checkpointing, torch.compile, FSDP1) insert these into parameter names;
# they are dropped so a parameter's initial value depends only on its model-level name.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
_NORMS = (RMSNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)

_MASK64 = (1 << 64) - 1


def _int64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 math)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GAMMA = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio)
_MIX = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, None))


#: Bytes of scratch per element generated at once (int64 index and scratch, two float32
#: uniforms; the planner's initialisation peak uses it).
TEMP_BYTES_PER_ELEMENT = 24


def chunk_elements(device_type: str) -> int:
    """Elements generated at once on a device type: 2^18 on CPU (small chunks stay in cache;
    6 MiB of scratch), 2^22 on accelerators (fewer kernel launches; 96 MiB)."""
    return 1 << 18 if device_type == "cpu" else 1 << 22


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    for shift, mult in _MIX:
        x ^= x >> shift
        if mult is not None:
            x = (x * (mult & _MASK64)) & _MASK64
    return x


def element_key(seed: int, name: str) -> int:
    """The generator key of parameter `name` (64 bits): splitmix64 of the seed, xor a hash of
    the name (blake2b: stable across processes and Python versions, unlike hash())."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return _splitmix64(seed & _MASK64) ^ digest


def counter_normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """N(0, 1) float32 samples for global element indices `index` (int64, any shape) of the
    parameter with generator key `key` (`element_key`); each element depends on its index only.

    h = splitmix64(key + (index + 1) * gamma); u1 = (h[63:40] + 1/2) / 2^24, u2 = h[23:0] / 2^24;
    value = sqrt(-2 ln u1) cos(2 pi u2) (Box and Muller, 1958). |value| < 5.9 (u1 >= 2^-25).
    Integer steps wrap modulo 2^64 exactly; a logical shift is an arithmetic one masked.
    """
    work = _Workspace(max(1, index.numel()), index.device)
    z = work.z[:index.numel()].view(index.shape)
    z.copy_(index)
    return work.normal_(key, z).clone()


class _Workspace:
    """Scratch for `limit` elements, reused for every chunk (no allocation, and no first-touch
    page faults, per chunk): int64 index/hash and scratch, two float32 uniforms."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.z = torch.empty(limit, dtype=torch.int64, device=device)
        self.tmp = torch.empty(limit, dtype=torch.int64, device=device)
        self.u = torch.empty(limit, dtype=torch.float32, device=device)
        self.a = torch.empty(limit, dtype=torch.float32, device=device)

    def normal_(self, key: int, z: torch.Tensor) -> torch.Tensor:
        """`counter_normal` of the indices in `z` (a view of self.z, overwritten); returns a
        view of self.u with z's shape."""
        n, shape = z.numel(), z.shape
        z = z.view(-1)
        tmp, u, a = self.tmp[:n], self.u[:n], self.a[:n]
        z.add_(1).mul_(_GAMMA).add_(_int64(key))
        for shift, mult in _MIX:
            torch.bitwise_right_shift(z, shift, out=tmp).bitwise_and_((1 << (64 - shift)) - 1)
            z.bitwise_xor_(tmp)
            if mult is not None:
                z.mul_(mult)
        torch.bitwise_right_shift(z, 40, out=tmp).bitwise_and_(0xFFFFFF)
        u.copy_(tmp).add_(0.5).mul_(2.0**-24)
        a.copy_(z.bitwise_and_(0xFFFFFF)).mul_(2 * math.pi * 2.0**-24)
        return u.log_().mul_(-2.0).sqrt_().mul_(a.cos_()).view(shape)


@dataclass
class LocalShard:
    """This rank's elements of a parameter: `tensor` (a view into the parameter's storage) is
    the block [offset, offset + tensor.shape) of the global tensor of shape `global_shape`."""

    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]

    def region(self) -> tuple[slice, ...]:
        """Where `tensor` sits in the global tensor, as an index: global[region] == tensor."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.tensor.shape))

    def boxes(self, limit: int) -> Iterator[tuple[slice, ...]]:
        """Index tuples that partition `tensor` into boxes of at most `limit` elements."""
        yield from _boxes(tuple(self.tensor.shape), 0, limit)

    def global_index(self, box: tuple[slice, ...], out: torch.Tensor) -> torch.Tensor:
        """Row-major global flat index of every element of tensor[box], written into the int64
        buffer `out` (at least as large); returns it viewed with tensor[box]'s shape."""
        shape, ndim = self.global_shape, len(self.global_shape)
        sizes, terms, stride = [], [], 1
        for d in reversed(range(ndim)):
            s = box[d] if d < len(box) else slice(0, self.tensor.shape[d])
            start, stop, _ = s.indices(self.tensor.shape[d])
            view = [1] * ndim
            view[d] = stop - start
            terms.append(torch.arange(self.offset[d] + start, self.offset[d] + stop,
                                      device=out.device).mul_(stride).view(view))
            sizes.insert(0, stop - start)
            stride *= shape[d]
        index = out[:math.prod(sizes)].view(sizes)
        if not terms:  # a 0-d parameter
            return index.zero_()
        index.copy_(terms[0])  # small per-dim ranges, broadcast into the box
        for term in terms[1:]:
            index.add_(term)
        return index


def _boxes(shape: tuple[int, ...], start_dim: int, limit: int) -> Iterator[tuple[slice, ...]]:
    if start_dim >= len(shape) or math.prod(shape[start_dim:]) <= limit:
        yield ()
        return
    inner = math.prod(shape[start_dim + 1:])
    n = shape[start_dim]
    if inner <= limit:  # whole rows of dim `start_dim`, `limit // inner` at a time
        step = limit // inner
        for i in range(0, n, step):
            yield (slice(i, min(i + step, n)),)
        return
    for i in range(n):  # one index of this dim at a time, split further inside
        for rest in _boxes(shape, start_dim + 1, limit):
            yield (slice(i, i + 1), *rest)


def local_shard(module: nn.Module, name: str, p: torch.Tensor) -> LocalShard:
    """Parameter `name` of `module` as this rank's block of the global tensor.

    A DTensor knows its global shape and this rank's offsets (placements); anything else is
    whole.
    Raises RuntimeError for a DTensor whose local block is not one contiguous box (a strided
    placement the offsets cannot describe).
    """
    if isinstance(p, DTensor):
        local = p.to_local()
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if tuple(shape) != tuple(local.shape):
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not the block "
                               f"{tuple(shape)} at {tuple(offset)} of {tuple(p.shape)}")
        return LocalShard(local, tuple(p.shape), tuple(offset))
    return LocalShard(p, tuple(p.shape), (0,) * p.dim())


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def _writes_residual(name: str, module: nn.Module, p_name: str) -> bool:
    return name.endswith(("wo.weight", "w2.weight")) or (
        isinstance(module, GroupedExperts) and p_name == "w2")


def named_parameters_once(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(canonical full name, owning module, name in the module, parameter), each parameter once
    (a tied parameter under its first name)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name), module, p_name, p


@torch.no_grad()
def init_parameters(model: nn.Module, cfg: Any, seed: int) -> None:
    """Initialise every parameter and buffer `model` holds on this rank, in place (rules: module
    docstring). `model`: a `Transformer`, a pipeline stage or `RankModel`, sharded or not, with
    the full model's parameter names; `cfg`: its `ModelConfig` (init_std, n_layers of the whole
    model). Meta tensors are skipped. The result does not depend on the layout: the gathered
    weights of any layout equal one process's, bit for bit.
    """
    std = cfg.init_std
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    for name, module, p_name, p in named_parameters_once(model):
        if p.is_meta:
            continue
        shard = local_shard(module, p_name, p)
        if isinstance(module, _NORMS) or p_name == "bias":
            shard.tensor.fill_(1.0 if isinstance(module, _NORMS) and p_name == "weight" else 0.0)
            continue
        normal_(shard, residual_std if _writes_residual(name, module, p_name) else std,
                element_key(seed, name))
    for b in model.buffers():
        if not b.is_meta:
            b.zero_()


def normal_(shard: LocalShard, std: float, key: int, limit: Optional[int] = None) -> None:
    """Fill this rank's block with std * counter_normal(key, global index), `limit` elements
    (default `chunk_elements`) at a time."""
    t = shard.tensor
    limit = min(limit or chunk_elements(t.device.type), max(1, t.numel()))
    work = _Workspace(limit, t.device)
    for box in shard.boxes(limit):
        t[box].copy_(work.normal_(key, shard.global_index(box, work.z)).mul_(std))


__all__ = ["TEMP_BYTES_PER_ELEMENT", "LocalShard", "canonical_name", "chunk_elements",
           "counter_normal", "element_key", "init_parameters", "local_shard",
           "named_parameters_once", "normal_"]
