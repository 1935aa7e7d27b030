"""Attention confined to documents packed into one window (`data.document_mask`).

A window holds several documents back to back, each ending with its EOS token. With document
masking a token attends only to the tokens of its own document up to itself, and RoPE sees its
position inside the document (0 at each document's first token). Both follow from two integer
positions per token:

    positions      i    its index in the window (under context parallelism its true index)
    doc_positions  p    its index in its document

A query at (i, p) sees exactly the keys at window indices j with i - p <= j <= i: its document
starts at i - p and nothing of it lies after i. So the mask needs no document ids of the keys,
only their window indices, which a context-parallel rank knows for every chunk from the zig-zag
layout alone (moetrain/parallel/context_parallel.py builds its masks from the same rule).

    document_mask(q_pos, k_pos, q_doc_pos)   boolean mask, True = attend
    document_attention(q, k, v, ...)         SDPA through that mask; on CUDA, flex attention
                                             with a block mask (skips the masked blocks)

The CUDA path (`torch.nn.attention.flex_attention`, compiled) is taken behind a capability check
(`flex_available`); the SDPA path is the reference the tests compare it with, and the one the
CPU runs. Megatron-LM calls this inter-document masking (its packed-sequence `cu_seqlens`),
torchtitan per-document positions with a flex block mask; Llama 3 trained with it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F


def document_positions(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The position of every token inside its document, [B, S] int64 for tokens [B, S]: 0 at
    the window's first token and after every EOS (the EOS ends its document)."""
    B, S = tokens.shape
    index = torch.arange(S, device=tokens.device).expand(B, S)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_mask(q_pos: torch.Tensor, k_pos: torch.Tensor,
                  q_doc_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) of queries at window positions q_pos [Sq] or [B, Sq] with
    document positions q_doc_pos [B, Sq] over keys at window positions k_pos [Sk] or [B, Sk]:
    [B, 1, Sq, Sk] (broadcast over heads). Key j is visible to query i iff
    i - doc_pos(i) <= j <= i."""
    q = q_pos.unsqueeze(-1)
    k = k_pos.unsqueeze(-2)
    start = (q_pos - q_doc_pos).unsqueeze(-1)
    mask = (k <= q) & (k >= start)
    return mask.unsqueeze(1)


def dense_document_attention(q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor,
                             positions: torch.Tensor, doc_positions: torch.Tensor,
                             scale: Optional[float] = None) -> torch.Tensor:
    """SDPA of q [B, Hq, S, d] over k/v [B, Hkv, S, d(_v)] of the same tokens, through
    `document_mask` (every query sees itself, so no row is empty)."""
    mask = document_mask(positions, positions, doc_positions)
    return F.scaled_dot_product_attention(q_BHSd, k_BKSd, v_BKSd, attn_mask=mask, scale=scale,
                                          enable_gqa=q_BHSd.shape[1] != k_BKSd.shape[1])


def flex_available(t: torch.Tensor) -> bool:
    """Whether the fused flex-attention path can run for tensors like `t`: a CUDA device and a
    torch with `torch.nn.attention.flex_attention` (2.5+; the GPU image has 2.11)."""
    if t.device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return True


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class _BlockMaskCache:
    """The block mask of the last (positions, doc_positions) tensors seen: every layer of one
    forward passes the same tensors, so the mask is built once per micro-batch, not per layer.
    The tensors are held (so no other tensor can take their place) and compared by identity
    and version."""

    def __init__(self) -> None:
        self.tensors: tuple = ()
        self.versions: tuple = ()
        self.mask = None

    def get(self, positions: torch.Tensor, doc_positions: torch.Tensor, S: int):
        from torch.nn.attention.flex_attention import create_block_mask

        tensors = (positions, doc_positions)
        versions = tuple(t._version for t in tensors)
        same = len(self.tensors) == 2 and all(a is b for a, b in zip(tensors, self.tensors))
        if not (same and versions == self.versions):
            B = doc_positions.shape[0]
            pos = positions.expand(B, S) if positions.dim() == 1 else positions
            start = pos - doc_positions

            def mask_mod(b, h, q_idx, kv_idx):
                k = pos[b, kv_idx]
                return (k <= pos[b, q_idx]) & (k >= start[b, q_idx])

            self.mask = create_block_mask(mask_mod, B, None, S, S, device=doc_positions.device)
            self.tensors, self.versions = tensors, versions
        return self.mask


_block_masks = _BlockMaskCache()


def flex_document_attention(q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor,
                            positions: torch.Tensor, doc_positions: torch.Tensor,
                            scale: Optional[float] = None, compiled: bool = True) -> torch.Tensor:
    """`dense_document_attention` by flex attention with a block mask (fully masked blocks are
    skipped). `compiled`: the fused kernel (torch.compile); False runs flex attention's eager
    implementation (the CPU tests compare it with the SDPA path)."""
    from torch.nn.attention.flex_attention import flex_attention

    S = q_BHSd.shape[2]
    block_mask = _block_masks.get(positions, doc_positions, S)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q_BHSd, k_BKSd, v_BKSd, block_mask=block_mask, scale=scale,
              enable_gqa=q_BHSd.shape[1] != k_BKSd.shape[1])


def document_attention(q_BHSd: torch.Tensor, k_BKSd: torch.Tensor, v_BKSd: torch.Tensor,
                       positions: torch.Tensor, doc_positions: torch.Tensor,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Attention of a whole window's queries over its keys inside each document: flex
    attention on CUDA (`flex_available`), else SDPA through the dense mask."""
    if flex_available(q_BHSd):
        return flex_document_attention(q_BHSd, k_BKSd, v_BKSd, positions, doc_positions, scale)
    return dense_document_attention(q_BHSd, k_BKSd, v_BKSd, positions, doc_positions, scale)


__all__ = ["dense_document_attention", "document_attention", "document_mask",
           "document_positions", "flex_available", "flex_document_attention"]
