"""Upcycling: initialise an MoE model from a dense model of the same trunk (BAM, AquilaMoE).

Given the full (unsharded) state of a dense model (every block a SwiGLU `mlp`; a moetrain
checkpoint, or a Llama / Qwen3 one read by moetrain/hf/load.py):

- embeddings, norms, attention and the output head are copied;
- blocks that are dense in the MoE model too copy their MLP;
- in MoE blocks every routed expert is initialised from the dense MLP. With granularity m
  (`model.init.upcycle_granularity`) the dense hidden width F is cut into m slices of F/m
  (= `model.moe.expert_hidden`); expert e takes slice e mod m, and its down projection is
  scaled by m. Routers keep their fresh initialisation.

Why the first forward equals the dense model's: with m = 1 every selected expert computes the
dense MLP, and renormalised top-k weights (`norm_topk_prob`) sum to one, so the combine is the
dense output for any routing. With m > 1 the output equals the dense one when a token's k = m
choices are one copy of each slice with equal weights (e.g. a zero-initialised router, which
picks experts 0..m-1 with weight 1/m each); a fresh random router only approximates it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moetrain.model.moe.experts import GroupedExperts


class UpcycleError(ValueError):
    """The dense state does not fit the MoE model; the message names the key."""


_SHARED = re.compile(r"layers\.\d+\.attention_norm\.weight|layers\.\d+\.ffn_norm\.weight|"
                     r"layers\.\d+\.attention\.w[qkvo]\.weight|layers\.\d+\.attention\.[qk]_norm\.weight|"
                     r"tok_embeddings\.weight|"
                     r"norm\.weight|output\.weight")


@torch.no_grad()
def upcycle_(model: nn.Module, dense: dict[str, torch.Tensor], granularity: int = 1) -> None:
    """Fill `model` (an unsharded MoE Transformer) from the dense model state `dense`, in place."""
    if granularity < 1:
        raise UpcycleError(f"model.init.upcycle_granularity={granularity} must be >= 1")
    target = model.state_dict()
    for key, tensor in dense.items():
        if _SHARED.fullmatch(key):
            _copy(target, key, tensor)
    for name, block in model.layers.items():
        w1, w3, w2 = (_dense(dense, f"layers.{name}.mlp.{w}.weight") for w in ("w1", "w3", "w2"))
        if block.mlp is not None:
            for w, value in (("w1", w1), ("w3", w3), ("w2", w2)):
                _copy(target, f"layers.{name}.mlp.{w}.weight", value)
            continue
        moe = block.moe
        if moe.shared_experts is not None:
            raise UpcycleError("upcycling with model.moe.num_shared_experts > 0 is not supported "
                               "(the shared expert would double the dense MLP's output)")
        _fill_experts(moe.experts, w1, w3, w2, granularity, f"layers.{name}")
    model.load_state_dict(target)


def _dense(dense: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in dense:
        raise UpcycleError(f"the dense checkpoint has no {key!r}: upcycling needs a dense model "
                           "(model.moe.first_dense_layers = model.n_layers) of the same trunk")
    return dense[key]


def _copy(target: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key not in target:
        raise UpcycleError(f"the MoE model has no {key!r}")
    if target[key].shape != value.shape:
        raise UpcycleError(f"{key}: the dense checkpoint has shape {list(value.shape)}, the MoE "
                           f"model {list(target[key].shape)} (model.d_model, n_heads, vocab_size ...)")
    target[key] = value.to(target[key].dtype)


def _fill_experts(experts: GroupedExperts, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                  m: int, where: str) -> None:
    # nn.Linear stores [out, in]; the stacked experts store w1/w3 as [E, D, F] and w2 as [E, F, D].
    E, D, F = experts.w1.shape
    dense_hidden = w1.shape[0]
    if dense_hidden != F * m:
        raise UpcycleError(
            f"{where}: model.moe.expert_hidden={F} x model.init.upcycle_granularity={m} must equal "
            f"the dense MLP width {dense_hidden}")
    for e in range(E):
        s = e % m
        rows = slice(s * F, (s + 1) * F)
        experts.w1[e].copy_(w1[rows].t())
        experts.w3[e].copy_(w3[rows].t())
        experts.w2[e].copy_(w2[:, rows].t() * m)
