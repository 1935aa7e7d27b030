"""Upcycling: initialise an MoE model from a dense model of the same trunk (BAM, AquilaMoE).

Given the full (unsharded) state of a dense model (every block a SwiGLU `mlp`; a moetrain
checkpoint, or a Llama / Qwen3 one read by moetrain/hf/load.py):

- embeddings, norms, attention and the output head are copied;
- blocks that are dense in the MoE model too copy their MLP;
- in MoE blocks every routed expert is initialised from the dense MLP. With granularity m
  (`model.init.upcycle_granularity`) the dense hidden width F is cut into m slices of F/m
  (= `model.moe.expert_hidden`); expert e takes slice e mod m, and its down projection is
  scaled by m. Routers keep their fresh initialisation.

The MoE model may be sharded (the trainer upcycles after parallelizing, on the allocated
shards): each rank copies only the blocks of its own shards, expert by expert, so no rank
builds a full stacked expert weight. The dense tensors are read one at a time, each whole
(they are the dense model's, not the MoE model's shards).

Why the first forward equals the dense model's: with m = 1 every selected expert computes the
dense MLP, and renormalised top-k weights (`norm_topk_prob`) sum to one, so the combine is the
dense output for any routing. With m > 1 the output equals the dense one when a token's k = m
choices are one copy of each slice with equal weights (e.g. a zero-initialised router, which
picks experts 0..m-1 with weight 1/m each); a fresh random router only approximates it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from moetrain.model.init import LocalShard, local_shard, named_parameters_once


class UpcycleError(ValueError):
    """The dense state does not fit the MoE model; the message names the key."""


_SHARED = re.compile(r"layers\.\d+\.attention_norm\.weight|layers\.\d+\.ffn_norm\.weight|"
                     r"layers\.\d+\.attention\.w[qkvo]\.weight|layers\.\d+\.attention\.[qk]_norm\.weight|"
                     r"tok_embeddings\.weight|"
                     r"norm\.weight|output\.weight")
_DENSE_MLP = re.compile(r"layers\.\d+\.mlp\.w[123]\.weight")
_EXPERTS = re.compile(r"layers\.(\d+)\.moe\.experts\.(w[123])")


@torch.no_grad()
def upcycle_(model: nn.Module, dense: Mapping[str, torch.Tensor], granularity: int = 1,
             whole: Optional[nn.Module] = None) -> None:
    """Fill `model` from the dense model state `dense`, in place.

    `model`: the MoE Transformer, whole or this rank's part of it (sharded parameters, a
    pipeline stage's `RankModel`). `dense`: the dense model's tensors by name, a dict or a
    mapping that reads each on access (`checkpoint.convert.ModelTensors`: then only the tensors
    this rank needs are read, one at a time, and `dense.shapes` answers the checks). `whole`:
    the whole unsharded MoE model the dense state is checked against (the meta device will do),
    so that every rank refuses the same input; default `model`. Raises UpcycleError naming the
    key that does not fit.
    """
    if granularity < 1:
        raise UpcycleError(f"model.init.upcycle_granularity={granularity} must be >= 1")
    shapes = getattr(dense, "shapes", None) or {k: v.shape for k, v in dense.items()}
    _check(model if whole is None else whole, shapes, granularity)
    for name, module, p_name, p in named_parameters_once(model):
        if p.is_meta:
            continue
        shard = local_shard(module, p_name, p)
        experts = _EXPERTS.fullmatch(name)
        if experts:
            layer, w = experts.groups()
            _fill_experts(shard, w, dense[f"layers.{layer}.mlp.{w}.weight"], granularity)
        elif _SHARED.fullmatch(name) and name in shapes or _DENSE_MLP.fullmatch(name):
            shard.tensor.copy_(dense[name][shard.region()])


def _check(whole: nn.Module, shapes: Mapping[str, torch.Size], m: int) -> None:
    """Every rank's decision, from shapes only: the same for every layout."""
    target = {name: p.shape for name, _, _, p in named_parameters_once(whole)}
    for key, shape in shapes.items():
        if _SHARED.fullmatch(key):
            _check_shape(target, key, shape)
    for name, block in whole.layers.items():
        w1, w3, w2 = (_dense(shapes, f"layers.{name}.mlp.{w}.weight") for w in ("w1", "w3", "w2"))
        if block.mlp is not None:
            for w, shape in (("w1", w1), ("w3", w3), ("w2", w2)):
                _check_shape(target, f"layers.{name}.mlp.{w}.weight", shape)
            continue
        if block.moe.shared_experts is not None:
            raise UpcycleError("upcycling with model.moe.num_shared_experts > 0 is not supported "
                               "(the shared expert would double the dense MLP's output)")
        F = block.moe.experts.w1.shape[-1]  # `whole`: the unsharded model
        if w1[0] != F * m:
            raise UpcycleError(
                f"layers.{name}: model.moe.expert_hidden={F} x model.init.upcycle_granularity="
                f"{m} must equal the dense MLP width {w1[0]}")


def _dense(shapes: Mapping[str, torch.Size], key: str) -> torch.Size:
    if key not in shapes:
        raise UpcycleError(f"the dense checkpoint has no {key!r}: upcycling needs a dense model "
                           "(model.moe.first_dense_layers = model.n_layers) of the same trunk")
    return shapes[key]


def _check_shape(target: dict[str, torch.Size], key: str, shape: torch.Size) -> None:
    if key not in target:
        raise UpcycleError(f"the MoE model has no {key!r}")
    if target[key] != shape:
        raise UpcycleError(f"{key}: the dense checkpoint has shape {list(shape)}, the MoE "
                           f"model {list(target[key])} (model.d_model, n_heads, vocab_size ...)")


def _fill_experts(shard: LocalShard, w: str, dense_w: torch.Tensor, m: int) -> None:
    """This rank's block of stacked expert weight `w` from the dense MLP's `w`: expert e is the
    dense hidden slice e mod m (nn.Linear stores [out, in]; w1/w3 are [E, D, F], w2 [E, F, D];
    w2 is scaled by m)."""
    F = shard.global_shape[2] if w != "w2" else shard.global_shape[1]
    _, inner_a, inner_b = shard.region()
    for i in range(shard.tensor.shape[0]):
        s = (shard.offset[0] + i) % m
        rows = slice(s * F, (s + 1) * F)
        expert = dense_w[:, rows].t() * m if w == "w2" else dense_w[rows].t()
        shard.tensor[i].copy_(expert[inner_a, inner_b])


__all__ = ["UpcycleError", "upcycle_"]
