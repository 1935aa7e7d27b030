"""Top-k router: fp32 logits, softmax or sigmoid scores, optional top-k renormalisation.

    logits[t, e]  = x[t] . W[e]                       (fp32, autocast off)
    scores[t, e]  = softmax_e(logits[t])  |  sigmoid(logits[t, e])
    topk_idx[t]   = the k experts with the largest scores[t]   (descending)
    topk_weight[t, j] = scores[t, topk_idx[t, j]]
                        / sum_j' scores[t, topk_idx[t, j']]     if norm_topk_prob

`norm_topk_prob` means the same thing for both score functions (one flag, one meaning); its
default (True) gives DeepSeek-V3's sigmoid routing and Mixtral/Qwen-MoE's softmax routing. With
top_k = 1 and norm_topk_prob the combine weight is constantly 1, so the router gets no gradient
from the LM loss (only from the aux losses) - Switch-style top-1 routing wants norm_topk_prob off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # fp32
    scores_TE: torch.Tensor  # fp32, softmax or sigmoid of the logits
    topk_weight_TK: torch.Tensor  # fp32 combine weights
    topk_idx_TK: torch.Tensor  # int64 expert ids, by descending score
    # Set by capacity dropping: which assignments survive (None = all, dropless) and the
    # per-expert capacity they were cut to.
    keep_TK: Optional[torch.Tensor] = None
    capacity: Optional[int] = None


class Router(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
    ):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"model.moe.score_func must be softmax or sigmoid, got {score_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"model.moe.top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, dim))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # fp32 even under bf16 autocast: routing decisions are sensitive to rounding.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight.float().T
        if self.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        topk_score_TK, topk_idx_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        weight_TK = topk_score_TK
        if self.norm_topk_prob:
            weight_TK = topk_score_TK / topk_score_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(logits_TE, scores_TE, weight_TK, topk_idx_TK)
