"""Multi-token prediction (MTP), as DeepSeek-V3 defines it (arXiv:2412.19437, section 2.2).

D sequential modules after the main model. Module k (1..D), at position i of the window:

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]     M_k: [2d -> d], no bias
    h_i^k  = TRM_k(h'_i^k)                                        one transformer block
    P_i^k  = OutHead(RMSNorm(h_i^k))                              logits of t_{i+k+1}

h^0 is the main model's last hidden state (before its final norm); Emb and OutHead are the main
model's embedding and output head, shared (not copies): the Transformer passes them in. The
concatenation puts the embedding first, as the released DeepSeek-V3 checkpoint's `eh_proj`
expects (the paper writes the other order, which is the same map with the columns swapped).
The block is dense or MoE (`model.mtp.block`; DeepSeek-V3's is MoE): its MoE layer is an
ordinary MoE layer of the model, numbered after the main model's (`moe_index`), so load
balancing, the expert bias and the routing statistics include it.

The loss, lambda / D * sum_k CE_k with each CE_k summed over the valid targets and divided by
the window's tokens (the paper's 1/T), is the step runner's (moetrain/parallel/loss.py); which
targets are valid (not past the window, not across a document): moetrain/model/inputs.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetrain.config.schema import ModelConfig
from moetrain.model.block import TransformerBlock
from moetrain.model.moe.schedule import schedule_value
from moetrain.model.norm import RMSNorm


def main_moe_layers(cfg: ModelConfig) -> int:
    """MoE layers of the main model (the blocks from model.moe.first_dense_layers on)."""
    return cfg.n_layers - cfg.moe.first_dense_layers


def num_moe_layers(cfg: ModelConfig) -> int:
    """MoE layers of the whole model: the main model's, then one per MoE MTP module."""
    return main_moe_layers(cfg) + (cfg.mtp.depth if cfg.mtp.block == "moe" else 0)


class MTPModule(nn.Module):
    """Module k of the multi-token prediction (module docstring): `forward` gives h^k [B, S, D]
    from h^{k-1} and the embeddings of the tokens k ahead, and RMSNorm(h^k) for the shared
    output head (`norm`: DeepSeek-V3's `shared_head.norm`). Everything the module holds runs
    inside its forward (a data-parallel unit gathers its parameters around it)."""

    def __init__(self, cfg: ModelConfig, depth_index: int):
        super().__init__()
        d = cfg.d_model
        self.enorm = RMSNorm(d, cfg.norm_eps)
        self.hnorm = RMSNorm(d, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        moe_index = main_moe_layers(cfg) + depth_index if cfg.mtp.block == "moe" else None
        self.block = TransformerBlock(cfg, moe_index=moe_index)
        self.norm = RMSNorm(d, cfg.norm_eps)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, positions: torch.Tensor,
                doc_positions: Optional[torch.Tensor] = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h^{k-1} [B, S, D] and Emb(t_{i+k}) [B, S, D] -> (h^k, RMSNorm(h^k)), [B, S, D]."""
        x_BSD = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        h_BSD = self.block(x_BSD, positions, doc_positions)
        return h_BSD, self.norm(h_BSD)


def mtp_loss_scale_at(mtp, step: int) -> float:
    """lambda at optimizer step `step` (0-based) of an `MTPConfig`: its loss_scale_schedule over
    loss_scale (moe/schedule.py has the kinds)."""
    return float(schedule_value(mtp.loss_scale_schedule, step, mtp.loss_scale))


def build_mtp(cfg: ModelConfig) -> Optional[nn.ModuleDict]:
    """The MTP modules of `model.mtp` ("0".."D-1"), or None for depth 0."""
    if cfg.mtp.depth == 0:
        return None
    return nn.ModuleDict({str(k): MTPModule(cfg, k) for k in range(cfg.mtp.depth)})


__all__ = ["MTPModule", "build_mtp", "main_moe_layers", "mtp_loss_scale_at", "num_moe_layers"]
