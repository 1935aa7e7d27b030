"""From a window of packed token ids to what the model computes on and what its outputs are
scored against: pure tensor functions, the same on every rank and in every layout.

    spec = InputSpec(mtp_depth=D, eos_id=eos, document_mask=True, mask_boundary=False)
    batch = model_inputs(window_BL, spec)     # window [B, S + 1] token ids, as the data gives them

    batch.tokens         [B, S]          window[:, :-1]
    batch.targets        [B, S]          window[:, 1:]                         (D = 0)
                         [B, S, 1 + D]   [..., 0] the next token, [..., k] the token k + 1
                                         ahead (the MTP target of depth k); IGNORE_INDEX where
                                         masked
    batch.doc_positions  [B, S] | None   positions inside the documents (data.document_mask)
    batch.mtp_tokens     [B, S, D] | None  [..., k-1] the token k ahead (the MTP input of depth k)

Which targets are masked. A document ends with its EOS token. The target k + 1 tokens ahead of
position i (k = 0 for the next token) is scored when it lies in the window and the chain
t_i, ..., t_{i+k} that predicts it stays inside one document - no EOS among t_i .. t_{i+k-1} -
and, with `mask_boundary` (data.boundary_loss=mask), t_{i+k} is not an EOS either. So with the
default (keep) the only cross-document target is the one an EOS predicts: the next document's
first token; with mask, none. The MTP rules hold whether or not attention is document-masked
(DeepSeek-V3 trains MTP on packed windows the same way); the next-token target past the
window never exists (the window holds S + 1 tokens).

MTP inputs are the true tokens even where the target is masked (a later position of the window
may attend to that position); past the window's end they are token 0: those positions are the
last of the window, which no scored position attends to (causal masking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from moetrain.model.documents import document_positions

#: Targets not scored (torch's cross-entropy default ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class InputSpec:
    """How windows become model inputs (module docstring): the MTP depth (model.mtp.depth), the
    data's EOS id, document masking (data.document_mask) and whether the EOS -> next document
    target is masked (data.boundary_loss=mask)."""

    mtp_depth: int = 0
    eos_id: Optional[int] = None
    document_mask: bool = False
    mask_boundary: bool = False

    @property
    def needs_eos(self) -> bool:
        return self.document_mask or self.mask_boundary or self.mtp_depth > 0


@dataclass
class ModelInputs:
    """One micro-batch (or this rank's part of it) as the model takes it (module docstring)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    doc_positions: Optional[torch.Tensor] = None
    mtp_tokens: Optional[torch.Tensor] = None

    def map(self, fn) -> "ModelInputs":
        """The same fields, each tensor passed through `fn` (e.g. context-parallel sharding
        along the sequence)."""
        return ModelInputs(fn(self.tokens), fn(self.targets),
                           None if self.doc_positions is None else fn(self.doc_positions),
                           None if self.mtp_tokens is None else fn(self.mtp_tokens))


def model_inputs(window: torch.Tensor, spec: InputSpec) -> ModelInputs:
    """The model inputs and targets of token windows [B, S + 1] (module docstring).
    Raises ValueError when the spec needs the EOS id and has none."""
    if spec.needs_eos and spec.eos_id is None:
        raise ValueError("document masking, boundary-loss masking and multi-token prediction "
                         "need the data's EOS id (InputSpec.eos_id)")
    tokens, nxt = window[:, :-1], window[:, 1:]
    B, S = tokens.shape
    D = spec.mtp_depth
    doc_positions = document_positions(tokens, spec.eos_id) if spec.document_mask else None
    if spec.mask_boundary:
        nxt = nxt.masked_fill(tokens == spec.eos_id, IGNORE_INDEX)
    if D == 0:
        return ModelInputs(tokens, nxt, doc_positions)

    is_eos = window == spec.eos_id
    doc = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before each token
    pad = D + 1  # so that every shifted slice below has S columns
    window_p = F.pad(window, (0, pad), value=0)
    doc_p = F.pad(doc, (0, pad), value=-1)  # no position past the window shares a document
    eos_p = F.pad(is_eos, (0, pad), value=False)
    index = torch.arange(S, device=window.device)
    targets = [nxt]
    mtp_tokens = []
    for k in range(1, D + 1):
        mtp_tokens.append(window_p[:, k:k + S])
        valid = (doc_p[:, k:k + S] == doc[:, :S]) & (index + k + 1 <= S)
        if spec.mask_boundary:
            valid &= ~eos_p[:, k:k + S]
        targets.append(window_p[:, k + 1:k + 1 + S].masked_fill(~valid, IGNORE_INDEX))
    return ModelInputs(tokens, torch.stack(targets, dim=-1), doc_positions,
                       torch.stack(mtp_tokens, dim=-1))


__all__ = ["IGNORE_INDEX", "InputSpec", "ModelInputs", "model_inputs"]
