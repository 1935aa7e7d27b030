"""Context parallelism (CP): every sequence split over the CP group, attention over all of it.

    shard_sequence / shard_positions   this rank's zig-zag chunks of a sequence and their positions
    apply_context_parallel(model, cp_group, cp_comm)   attention over the CP group's sequence
    allgather_attention / ring_attention               the two ways to see the other ranks' K/V

Zig-zag load balancing, masking from true positions, the all-gather and ring algorithms and why
the ring is one explicit autograd.Function: docs/context_parallel.md. Packed documents
(`doc_positions`, moetrain/model/documents.py): a query at true position i and document
position p sees the keys at true positions i - p .. i, on whichever rank they are; a document
may span chunks and ranks, and a block of keys with nothing visible to a query row adds
nothing to it. Hand-written rather than
torch's experimental `context_parallel`, which has no CPU SDPA strategy (gloo tests) and patches
SDPA globally; this swaps one `attention_fn` and composes with TP and MLA.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from moetrain.model.attention import Attention, causal_max_logits
from moetrain.model.documents import document_mask
from moetrain.model.mla import MultiHeadLatentAttention

# torch 2.13 renamed it (the old name warns); the GPU image's torch 2.11 has only the old one.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or getattr(
    funcol, "all_gather_tensor_autograd"
)


# ---------------------------------------------------------------------------- sharding


def _zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def shard_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of `x` along `dim`: chunks r and 2cp-1-r of 2*cp equal chunks."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside a CP group of size {cp_size}")
    if cp_size == 1:
        return x
    S = x.shape[dim]
    if S % (2 * cp_size):
        raise ValueError(
            f"sequence length {S} is not divisible by 2*cp = {2 * cp_size} (zig-zag CP sharding)"
        )
    c = S // (2 * cp_size)
    lo, hi = _zigzag_chunks(cp_rank, cp_size)
    return torch.cat([x.narrow(dim, lo * c, c), x.narrow(dim, hi * c, c)], dim=dim)


def shard_positions(
    seq_len: int, cp_rank: int, cp_size: int, device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """The true positions [seq_len / cp] (int64) of this CP rank's tokens, for RoPE and masks."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp_size, dim=0)


def _sequence_order(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate every CP rank's local tensor (parts[r], zig-zag) in true sequence order."""
    cp = len(parts)
    halves = [p.chunk(2, dim) for p in parts]
    chunks = [halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))]
    return torch.cat(chunks, dim=dim)


# ---------------------------------------------------------------------------- masks


def _causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) from positions [Sq]/[B, Sq] and [Sk]/[B, Sk]:
    [Sq, Sk] or [B, 1, Sq, Sk] (broadcast over heads)."""
    mask = q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)
    return mask if mask.dim() == 2 else mask.unsqueeze(1)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
    if q.shape[2] % 2:
        raise ValueError(f"a CP rank's sequence length must be even (2 chunks), got {q.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if positions.shape[-1] != q.shape[2]:
        raise ValueError(
            f"positions {tuple(positions.shape)} do not match the local sequence length "
            f"{q.shape[2]} (pass shard_positions(...) to the model)"
        )


# ---------------------------------------------------------------------------- allgather


def allgather_attention(
    q_BHSd: torch.Tensor,
    k_BKSd: torch.Tensor,
    v_BKSd: torch.Tensor,
    positions: torch.Tensor,
    cp_group: dist.ProcessGroup,
    scale: Optional[float] = None,
    doc_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of local queries over the whole sequence, K/V all-gathered (their head
    widths may differ, as in multi-head latent attention); `scale` None = 1/sqrt(d_qk);
    `doc_positions` [B, S/cp]: inside each document (module docstring)."""
    _check_shapes(q_BHSd, k_BKSd, positions)
    cp = dist.get_world_size(cp_group)
    r = dist.get_rank(cp_group)
    gqa = q_BHSd.shape[1] != k_BKSd.shape[1]
    d_k = k_BKSd.shape[-1]
    kv_BKSe = torch.cat([k_BKSd, v_BKSd], dim=-1)  # one collective for both
    gathered = _all_gather_autograd(kv_BKSe.unsqueeze(0), 0, cp_group)  # [cp, B, K, S/cp, e]
    kv_full = _sequence_order(list(gathered.unbind(0)), dim=2)
    k_full, v_full = kv_full[..., :d_k], kv_full[..., d_k:]

    c = q_BHSd.shape[2] // 2
    outs = []
    for half, chunk in enumerate(_zigzag_chunks(r, cp)):
        rows = slice(half * c, (half + 1) * c)
        n = (chunk + 1) * c
        if doc_positions is not None:  # keys at true positions 0..n-1, in sequence order
            k_pos = torch.arange(n, device=positions.device)
            mask = document_mask(positions[..., rows], k_pos, doc_positions[..., rows])
        else:
            # Keys of earlier chunks are all visible; the diagonal chunk is this rank's own half.
            diag = _causal_mask(positions[..., rows], positions[..., rows])
            visible = diag.new_ones(diag.shape[:-1] + (chunk * c,))
            mask = torch.cat([visible, diag], dim=-1)
        outs.append(F.scaled_dot_product_attention(
            q_BHSd[:, :, rows], k_full[:, :, :n], v_full[:, :, :n], attn_mask=mask,
            enable_gqa=gqa, scale=scale,
        ))
    return torch.cat(outs, dim=2)


# ---------------------------------------------------------------------------- ring


def _block_forward(q5, k5, v5, mask, scale):
    """Partial attention of q5 [B, K, G, Sq, d] over k5/v5 [B, K, 1, Sk, d] (fp32).

    Returns (out [B, K, G, Sq, d], lse [B, K, G, Sq]); out is normalised within the block. A
    query row that sees no key of the block (documents) gets out 0 and lse -inf."""
    s = torch.matmul(q5, k5.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = lse.masked_fill(torch.isinf(lse), 0.0)  # exp(-inf - 0) = 0 for an empty row
    return torch.matmul(torch.exp(s - finite.unsqueeze(-1)), v5), lse


def _block_backward(q5, k5, v5, mask, scale, dout5, lse, delta):
    """Gradients of one block given the FINAL lse and delta = rowsum(dout * out)."""
    s = torch.matmul(q5, k5.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))
    dv5 = torch.matmul(p.transpose(-1, -2), dout5).sum(2, keepdim=True)
    ds = p * (torch.matmul(dout5, v5.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq5 = torch.matmul(ds, k5) * scale
    dk5 = torch.matmul(ds.transpose(-1, -2), q5).sum(2, keepdim=True) * scale
    return dq5, dk5, dv5


def _mask5(positions: torch.Tensor) -> torch.Tensor:
    """The local diagonal mask, broadcastable to [B, K, G, S, S]."""
    mask = positions.unsqueeze(-1) >= positions.unsqueeze(-2)
    return mask if mask.dim() == 2 else mask[:, None, None]


def _document_mask5(positions: torch.Tensor, doc_positions: torch.Tensor, rows: slice,
                    src: int, cols: slice, cp: int) -> torch.Tensor:
    """The document mask of this rank's query rows over CP rank `src`'s key block `cols`
    (keys at src's true positions), broadcastable to [B, K, G, Sq, Sk]."""
    S_local = doc_positions.shape[-1]
    k_pos = shard_positions(S_local * cp, src, cp, device=positions.device)[cols]
    return document_mask(positions[..., rows], k_pos, doc_positions[..., rows]).unsqueeze(1)


def _ring_plan(step: int, r: int, cp: int, c: int):
    """(query rows, key rows, use the local mask) of ring step `step` on CP rank r.

    At step s the rank holds the K/V of rank src = r - s. s = 0: the own block, causal mask.
    src < r: both local query chunks (r, 2cp-1-r) see src's lower chunk and neither sees its
    upper chunk 2cp-1-src. src > r: only the upper query chunk sees anything, and all of it."""
    src = (r - step) % cp
    if step == 0:
        return slice(None), slice(None), True
    if src < r:
        return slice(None), slice(0, c), False
    return slice(c, None), slice(None), False


class _Ring:
    """The two ring neighbours of this rank, as global ranks."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Post send-to-next and receive-from-prev; returns the requests to wait on."""
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        return dist.batch_isend_irecv(ops)


def _wait(reqs: Optional[list]) -> None:
    for req in reqs or ():
        req.wait()


def _ring_mask(positions, doc_positions, mask, step, rows, cols, masked, ring):
    """The mask of a ring step's block (None: all visible)."""
    if doc_positions is not None:
        src = (ring.rank - step) % ring.size
        return _document_mask5(positions, doc_positions, rows, src, cols, ring.size)
    return mask if masked else None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, group, scale, doc_positions):
        ring = _Ring(group)
        B, H, S, d = q.shape
        K, d_v = k.shape[1], v.shape[-1]
        c = S // 2
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        q5 = q.float().unflatten(1, (K, H // K))
        mask = _mask5(positions)
        kv = torch.cat([k, v], dim=-1)  # travels in the input dtype; [B, K, S, d + d_v]
        out = q5.new_zeros(q5.shape[:-1] + (d_v,))
        lse = torch.full(q5.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ring.size):
            reqs, incoming = None, None
            if step + 1 < ring.size:  # next block's transfer overlaps this block's compute
                incoming = torch.empty_like(kv)
                reqs = ring.exchange(kv, incoming)
            rows, cols, masked = _ring_plan(step, ring.rank, ring.size, c)
            k5 = kv[:, :, cols, :d].float().unsqueeze(2)
            v5 = kv[:, :, cols, d:].float().unsqueeze(2)
            block_mask = _ring_mask(positions, doc_positions, mask, step, rows, cols, masked, ring)
            o_b, l_b = _block_forward(q5[..., rows, :], k5, v5, block_mask, scale)
            l_old = lse[..., rows]  # finite after step 0: every query sees itself
            l_new = torch.logaddexp(l_old, l_b)
            out[..., rows, :] = (out[..., rows, :] * torch.exp(l_old - l_new).unsqueeze(-1)
                                 + o_b * torch.exp(l_b - l_new).unsqueeze(-1))
            lse[..., rows] = l_new
            _wait(reqs)
            if incoming is not None:
                kv = incoming
        ctx.group, ctx.scale, ctx.documents = group, scale, doc_positions is not None
        ctx.save_for_backward(q, k, v, positions, out, lse,
                              *(() if doc_positions is None else (doc_positions,)))
        return out.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, positions, out, lse, *rest = ctx.saved_tensors
        doc_positions = rest[0] if ctx.documents else None
        ring = _Ring(ctx.group)
        B, H, S, d = q.shape
        K = k.shape[1]
        c = S // 2
        scale = ctx.scale
        q5 = q.float().unflatten(1, (K, H // K))
        dout5 = dout.float().unflatten(1, (K, H // K))
        delta = (dout5 * out).sum(-1)
        mask = _mask5(positions)
        dq5 = torch.zeros_like(q5)
        kv = torch.cat([k, v], dim=-1)
        # dK/dV of the block a rank holds travel with it (fp32) and reach the owner after
        # the last step's extra hop: at step s rank r holds src r-s's block and the partial
        # dK/dV that ranks r-s .. r-1 added to it.
        dkv_reqs, dkv_in = None, None
        for step in range(ring.size):
            reqs, incoming = None, None
            if step + 1 < ring.size:
                incoming = torch.empty_like(kv)
                reqs = ring.exchange(kv, incoming)
            rows, cols, masked = _ring_plan(step, ring.rank, ring.size, c)
            k5 = kv[:, :, cols, :d].float().unsqueeze(2)
            v5 = kv[:, :, cols, d:].float().unsqueeze(2)
            block_mask = _ring_mask(positions, doc_positions, mask, step, rows, cols, masked, ring)
            dq_b, dk_b, dv_b = _block_backward(
                q5[..., rows, :], k5, v5, block_mask, scale,
                dout5[..., rows, :], lse[..., rows], delta[..., rows],
            )
            dq5[..., rows, :] += dq_b
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            dkv[:, :, cols, :d] = dk_b.squeeze(2)
            dkv[:, :, cols, d:] = dv_b.squeeze(2)
            _wait(dkv_reqs)
            if dkv_in is not None:
                dkv += dkv_in
            if ring.size > 1:  # after the last step this is the hop home
                dkv_in = torch.empty_like(dkv)
                dkv_reqs = ring.exchange(dkv, dkv_in)
            else:
                dkv_in = dkv
            _wait(reqs)
            if incoming is not None:
                kv = incoming
        _wait(dkv_reqs)
        dq = dq5.flatten(1, 2).to(q.dtype)
        return (dq, dkv_in[..., :d].to(k.dtype), dkv_in[..., d:].to(v.dtype), None, None,
                None, None)


def ring_attention(
    q_BHSd: torch.Tensor,
    k_BKSd: torch.Tensor,
    v_BKSd: torch.Tensor,
    positions: torch.Tensor,
    cp_group: dist.ProcessGroup,
    scale: Optional[float] = None,
    doc_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention of local queries over the whole sequence, K/V passed around the ring
    (their head widths may differ); `scale` None = 1/sqrt(d_qk); `doc_positions` [B, S/cp]:
    inside each document (module docstring)."""
    _check_shapes(q_BHSd, k_BKSd, positions)
    return _RingAttention.apply(q_BHSd, k_BKSd, v_BKSd, positions, cp_group, scale,
                                doc_positions)


# ---------------------------------------------------------------------------- installation


class ContextParallelAttention:
    """An `AttentionFn`: (q [B, Hq, S/cp, d], k [B, Hkv, S/cp, d], v [B, Hkv, S/cp, d_v],
    positions, scale, doc_positions) -> [B, Hq, S/cp, d_v], attending over the CP group's whole
    sequence (inside each document with doc_positions)."""

    def __init__(self, cp_group: dist.ProcessGroup, cp_comm: str = "allgather"):
        assert cp_comm in ("allgather", "ring"), cp_comm  # the schema's CPComm
        self.cp_group = cp_group
        self.cp_comm = cp_comm
        self._fn = allgather_attention if cp_comm == "allgather" else ring_attention

    def __call__(self, q_BHSd, k_BKSd, v_BKSd, positions, scale=None, doc_positions=None):
        return self._fn(q_BHSd, k_BKSd, v_BKSd, positions, self.cp_group, scale, doc_positions)

    def max_logits(self, q_BHSd, k_BKSd, positions, scale=None,
                   doc_positions=None) -> torch.Tensor:
        """The largest causal logit of each local query head [Hq] over the whole sequence
        (a `MaxLogitsFn`, for MuonClip): the keys and their positions all-gathered over the CP
        group (no gradient; the mask comes from the positions and the queries' document
        positions, so the keys' order is free)."""
        cp = dist.get_world_size(self.cp_group)
        def gather(x: torch.Tensor) -> list[torch.Tensor]:  # every CP rank's x, by rank
            x = x.contiguous()
            out = x.new_empty((cp * x.shape[0], *x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=self.cp_group)
            return list(out.view(cp, *x.shape).unbind(0))

        keys = torch.cat(gather(k_BKSd.detach()), dim=2)  # [B, K, S, d], rank order
        key_positions = torch.cat(gather(positions), dim=-1)
        return causal_max_logits(q_BHSd, keys, positions, scale, k_positions=key_positions,
                                 doc_positions=doc_positions)

    def __repr__(self) -> str:
        return (f"ContextParallelAttention(cp={dist.get_world_size(self.cp_group)}, "
                f"comm={self.cp_comm})")


def apply_context_parallel(
    model: nn.Module, cp_group: dist.ProcessGroup, cp_comm: str = "allgather"
) -> nn.Module:
    """Make every attention (`Attention`, `MultiHeadLatentAttention`) of `model` attend over
    the CP group's whole sequence, in place.

    Works on the plain model and after tensor parallelism (each TP rank's attention sees its
    local heads as plain tensors). The caller feeds each rank `shard_sequence`'d tokens and
    `shard_positions` (see the module docstring). A CP group of size 1 leaves the model as is.
    """
    if dist.get_world_size(cp_group) == 1:
        return model
    fn = ContextParallelAttention(cp_group, cp_comm)
    found = 0
    for module in model.modules():
        if isinstance(module, (Attention, MultiHeadLatentAttention)):
            module.attention_fn = fn
            module.max_logits_fn = fn.max_logits
            found += 1
    if not found:
        raise ValueError("apply_context_parallel found no moetrain Attention module in the model")
    return model


__all__ = [
    "ContextParallelAttention",
    "allgather_attention",
    "apply_context_parallel",
    "ring_attention",
    "shard_positions",
    "shard_sequence",
]
