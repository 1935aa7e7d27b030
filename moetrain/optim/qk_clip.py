"""MuonClip's QK-clip (Kimi K2, "Kimi K2: Open Agentic Intelligence", arXiv:2507.20534,
section 2.1): after each optimizer step, every attention head whose largest pre-softmax logit
of the step exceeded the threshold has its query and key projections scaled so that its
logits shrink by eta = threshold / max logit (optim.qk_clip_threshold).

    clip = QKClip(model, threshold, n_layers, n_heads, mtp_depth)
    table = clip.head_maxima(tp_rank, tp)    # [L, H] this rank's heads' step maxima, 0 elsewhere
    ... the table's maximum over the ranks (StepRunner.reduce_step's `per_rank`, the step's one
    reduction; StepSums.rank_maximum)
    clip.apply_(step_max_LH)                 # after optimizer.step()

The attention modules keep their heads' maxima in the forward (moetrain/model/attention.py,
`MaxLogitTracking`, no host read); which rows of which projection scale by what is theirs to
say (`qk_clip_scales`: GQA, MLA's head-specific parts); this module scales whatever shard of
those rows this rank holds (its rows from DTensor's placements,
moetrain/parallel/whole_matrices.py).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.model.attention import attention_layers, take_max_logits, track_max_logits
from moetrain.parallel.whole_matrices import shard_indices


class QKClip:
    """QK-clip for the attention layers of `model` (a rank's model: its stages under PP): the
    n_layers blocks' and the `mtp_depth` multi-token prediction blocks' (rows n_layers + k of
    the table; L = n_layers + mtp_depth)."""

    def __init__(self, model: nn.Module, threshold: float, n_layers: int, n_heads: int,
                 mtp_depth: int = 0) -> None:
        if threshold <= 0:
            raise ValueError(f"qk_clip threshold must be > 0, got {threshold}")
        self.threshold, self.n_layers, self.n_heads = threshold, n_layers, n_heads
        self.rows = n_layers + mtp_depth
        self.model = model
        self.layers = attention_layers(model, n_layers)
        # per layer: [(parameter name in the attention, parameter, this rank's rows of it)]
        self._rows: dict[int, list[tuple[str, nn.Parameter, Union[slice, torch.Tensor]]]] = {}
        for layer, module in self.layers:
            names = module.qk_clip_scales(torch.ones(n_heads)).keys()
            self._rows[layer] = [(n, module.get_parameter(n), _rows(module.get_parameter(n)))
                                 for n in names]
        track_max_logits(model, n_layers=n_layers)

    def head_maxima(self, tp_rank: int = 0, tp: int = 1) -> torch.Tensor:
        """[n_layers + mtp_depth, n_heads] fp32: this rank's heads' largest logits since the last
        call (tensor parallelism splits the heads: TP rank t holds heads [t H/tp, (t+1) H/tp)),
        zeros where this rank has no head (other stages, other TP ranks); resets them."""
        device = next(self.model.parameters()).device
        table = torch.zeros(self.rows, self.n_heads, dtype=torch.float32, device=device)
        for layer, values in take_max_logits(self.model, self.n_layers):
            local = self.n_heads // tp
            table[layer, tp_rank * local:(tp_rank + 1) * local] = values.to(device)
        return table

    @torch.no_grad()
    def apply_(self, step_max_LH: torch.Tensor) -> None:
        """Scale the q/k projections of every head whose largest logit of the step (the table
        over every rank, [n_layers + mtp_depth, n_heads]) exceeds the threshold; no host read."""
        step_max_LH = step_max_LH.to(torch.float32)
        eta = torch.where(step_max_LH > self.threshold,
                          self.threshold / step_max_LH.clamp(min=self.threshold), 1.0)
        for layer, module in self.layers:
            factors = module.qk_clip_scales(eta[layer])
            for name, param, rows in self._rows[layer]:
                local = param.to_local() if isinstance(param, DTensor) else param
                local.mul_(factors[name].to(local.device, local.dtype)[rows].unsqueeze(-1))


def _rows(param: torch.Tensor) -> Union[slice, torch.Tensor]:
    rows = shard_indices(param)[0]
    if isinstance(rows, range):
        return slice(rows.start, rows.stop)
    return torch.tensor(rows, device=param.device)


__all__ = ["QKClip"]
