"""Dense SwiGLU feed-forward block (also used as the shared expert of an MoE layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection.

    Separate nn.Linear layers so tensor parallelism can shard w1/w3 colwise and w2 rowwise.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
