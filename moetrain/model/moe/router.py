"""Router: fp32 logits, softmax or sigmoid scores, expert selection, combine weights.

    logits[t, e]  = x[t] . W[e]                       (fp32, autocast off)
    scores[t, e]  = softmax_e(logits[t])  |  sigmoid(logits[t, e])
    select[t, e]  = scores[t, e] + bias[e]            (bias: aux-loss-free balancing, else 0)
                    restricted to the allowed groups  (group-limited routing, else all experts)
    topk_idx[t]   = the k experts with the largest select[t]   (descending)
    topk_weight[t, j] = scores[t, topk_idx[t, j]]                (unbiased)
                        / sum over active j' of scores[t, topk_idx[t, j']]   if norm_topk_prob
                        * routed_scaling_factor                  (DeepSeek-V2/V3; else 1)

`norm_topk_prob` means the same thing for both score functions (one flag, one meaning); its
default (True) gives DeepSeek-V3's sigmoid routing and Mixtral/Qwen-MoE's softmax routing.
The bias is always part of selection (zero unless moved by `bias_rate` or loaded with a
checkpoint, e.g. DeepSeek-V3's `e_score_correction_bias`). A group's score under `limited` is
the sum of its two best selection scores (DeepSeek-V3) or its best one (`group_score=max`,
DeepSeek-V2's group_limited_greedy). With
top_k = 1 and norm_topk_prob the combine weight is constantly 1, so the router gets no gradient
from the LM loss (only from the aux losses) - Switch-style top-1 routing wants norm_topk_prob off.

Not every selected assignment has to be computed (`active_TK`):
- threshold routing (`top_p`): assignment j of token t is active while the probabilities of the
  assignments before it sum to less than top_p, and always for j < min_k;
- null experts (ids >= num_experts): selected like experts, they count in the load-balancing
  loss, but compute nothing, so the token's output is the weighted sum of its real experts only.
The top-k is taken with the `top_k` the forward is given (the MoE layer's, which a schedule may
change between steps); the constructor's is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moetrain.config.schema import RoutingConfig


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # fp32, over real and null experts
    scores_TE: torch.Tensor  # fp32, softmax or sigmoid of the logits
    topk_weight_TK: torch.Tensor  # fp32 combine weights
    topk_idx_TK: torch.Tensor  # int64 expert ids, by descending selection score
    # Set by capacity dropping: which assignments survive (None = all, dropless) and the
    # per-expert capacity they were cut to.
    keep_TK: Optional[torch.Tensor] = None
    capacity: Optional[int] = None
    # Assignments that need compute (None = all): False for null experts and for assignments
    # beyond a token's top-p threshold. Dropping by capacity applies to active ones only.
    active_TK: Optional[torch.Tensor] = None
    # Assignments the token took (None = all k): False only beyond a top-p threshold. Null
    # experts are selected (they count in the load-balancing loss) but not active.
    selected_TK: Optional[torch.Tensor] = None


class Router(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score_func: str = "softmax",
        norm_topk_prob: bool = True,
        routing: Optional[RoutingConfig] = None,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        routing = routing or RoutingConfig()
        slots = num_experts + routing.num_null_experts
        assert score_func in ("softmax", "sigmoid") and 1 <= top_k <= slots  # validated config
        self.top_k = top_k  # the default of `forward`
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.routing = routing
        self.num_real_experts = num_experts
        self.weight = nn.Parameter(torch.empty(slots, dim))
        # A buffer, not a parameter: no gradient, but saved in checkpoints with the model.
        self.register_buffer("expert_bias", torch.zeros(slots), persistent=True)

    @property
    def num_experts(self) -> int:
        """Routing slots: real experts plus null experts."""
        return self.weight.shape[0]

    def forward(self, x_TD: torch.Tensor, top_k: Optional[int] = None) -> RouterOutput:
        """x [T, D] -> the routing of its T tokens to `top_k` slots each (default: the
        constructor's top_k)."""
        k = self.top_k if top_k is None else top_k
        # fp32 even under bf16 autocast: routing decisions are sensitive to rounding.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight.float().T
        if self.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        topk_idx_TK = self.select(scores_TE.detach(), k)
        topk_score_TK = scores_TE.gather(1, topk_idx_TK)
        within_TK = self._within_threshold(topk_score_TK.detach(), scores_TE.detach())
        active_TK = within_TK
        if self.num_experts > self.num_real_experts:  # null experts compute nothing
            real_TK = topk_idx_TK < self.num_real_experts
            active_TK = real_TK if active_TK is None else active_TK & real_TK
        weight_TK = topk_score_TK
        if self.norm_topk_prob:
            # Null experts keep their share of the weight (their output is zero): choosing one
            # scales the token's expert output down, as in AdaMoE.
            counted_TK = topk_score_TK if within_TK is None else topk_score_TK * within_TK
            weight_TK = topk_score_TK / counted_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.routed_scaling_factor != 1.0:
            weight_TK = weight_TK * self.routed_scaling_factor
        return RouterOutput(logits_TE, scores_TE, weight_TK, topk_idx_TK, active_TK=active_TK,
                            selected_TK=within_TK)

    @torch.no_grad()
    def select(self, scores_TE: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
        """Expert ids [T, k] by descending selection score (bias and groups applied)."""
        r, k = self.routing, self.top_k if top_k is None else top_k
        select_TE = scores_TE + self.expert_bias
        if r.group_mode == "none" or r.num_groups == 1:
            return torch.topk(select_TE, k, dim=-1).indices
        T, E = select_TE.shape
        G = r.num_groups
        grouped_TGM = select_TE.view(T, G, E // G)
        if r.group_mode == "balanced":
            # Equal picks per group: load across groups (devices) is balanced by construction.
            per_group = k // G
            local_TGP = torch.topk(grouped_TGM, per_group, dim=-1).indices
            idx_TK = (local_TGP + torch.arange(G, device=local_TGP.device).view(1, G, 1) * (E // G)).view(T, k)
            order = torch.argsort(select_TE.gather(1, idx_TK), dim=-1, descending=True, stable=True)
            return idx_TK.gather(1, order)
        # limited: a group's score is the sum of its two best experts (one if groups are single),
        # or its best expert.
        best = 1 if r.group_score == "max" else min(2, E // G)
        group_score_TG = torch.topk(grouped_TGM, best, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
            1, torch.topk(group_score_TG, r.topk_groups, dim=-1).indices, True)
        masked_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(E // G, dim=1), float("-inf"))
        return torch.topk(masked_TE, k, dim=-1).indices

    def _within_threshold(self, topk_score_TK, scores_TE) -> Optional[torch.Tensor]:
        """Top-p: assignment j is taken while the probabilities before it sum to < top_p."""
        r = self.routing
        if r.top_p is None:
            return None
        probs_TK = topk_score_TK
        if self.score_func == "sigmoid":  # sigmoid scores are not a distribution
            probs_TK = probs_TK / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        before_TK = torch.cumsum(probs_TK, dim=-1) - probs_TK
        position_K = torch.arange(probs_TK.shape[1], device=probs_TK.device)
        return (before_TK < r.top_p) | (position_K < r.min_k)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts by
        bias_rate, lower over-loaded ones, leave those at the mean load.

        `tokens_per_expert_E` [num_real_experts] integer: the step's global load (the same on
        every rank, so every replica of the bias moves identically). The direction
        sign(mean - load_i) is computed exactly, in integers, as sign(sum - E * load_i): a float
        mean is inexact at real scale (loads of 2**24 and more)."""
        rate = self.routing.bias_rate
        if rate <= 0:
            return
        load_E = tokens_per_expert_E.to(device=self.expert_bias.device, dtype=torch.int64)
        E = self.num_real_experts
        direction_E = torch.sign(load_E.sum() - E * load_E)
        self.expert_bias[:E] += rate * direction_E.to(self.expert_bias.dtype)
