"""The step's loss over the model's outputs: the LM cross-entropy and the multi-token-prediction
losses, and the sums the step logs.

    loss = StepLoss(mtp_depth)
    loss.start(tokens_per_step, mtp_loss_scale)          # once per optimizer step
    (loss(outputs, targets)).backward()                  # per micro-batch (the pipeline's loss_fn)
    loss.sums()                                          # {"lm_sum", "lm_targets", "mtp_sum",
                                                         #  "mtp_targets"} of this rank's tokens

Each micro-batch contributes

    ( sum_i CE(logits_i, t_i) + lambda / D * sum_k sum_i CE(logits^k_i, t^k_i) ) / tokens_per_step

over its scored targets (moetrain/model/inputs.py): the LM loss summed and divided by the global
batch's tokens, as before, and DeepSeek-V3's MTP loss lambda / D * sum_k L_k with each L_k
divided by the window's tokens T too (arXiv:2412.19437, eq. 24: 1/T, not 1/(T - k)). Gradients
summed over micro-batches and ranks are those of the global batch. What is logged is the mean
over the scored targets (`lm_sum / lm_targets`, `mtp_sum[k] / mtp_targets[k]`).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moetrain.model.inputs import IGNORE_INDEX

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits [B, S, V] against targets [B, S] (IGNORE_INDEX not
    scored), an fp32 scalar; call inside `StepRunner.loss_context()`. Under TP the logits are
    vocab-sharded and the sum is a DTensor replicated over TP: its local value is the whole
    micro-batch's (and backward through to_local gives each replica the same gradient)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)
    return loss.to_local() if isinstance(loss, DTensor) else loss


class StepLoss:
    """The loss function of a step's micro-batches (module docstring); keeps this rank's sums.

    `mtp_depth` D: the model's outputs are the tuple (logits, D MTP logits) and the targets
    [B, S, 1 + D]; for D = 0 the logits and targets [B, S]."""

    def __init__(self, mtp_depth: int = 0) -> None:
        self.mtp_depth = mtp_depth
        self.tokens_per_step = 1
        self.mtp_weight = 0.0
        self._sums: list[torch.Tensor] = []  # per micro-batch: [lm, lm targets, mtp..., n...]

    def start(self, tokens_per_step: int, mtp_loss_scale: float = 0.0) -> None:
        """Before a step's (or an evaluation's) first micro-batch: the divisor (tokens of the
        global batch) and lambda (model.mtp.loss_scale at this step); the sums restart."""
        self.tokens_per_step = tokens_per_step
        self.mtp_weight = mtp_loss_scale / self.mtp_depth if self.mtp_depth else 0.0
        self._sums.clear()

    def __call__(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        D = self.mtp_depth
        logits = outputs[0] if D else outputs
        main_targets = targets[..., 0] if D else targets
        lm = cross_entropy_sum(logits, main_targets)
        loss = lm
        row = [lm.detach(), (main_targets != IGNORE_INDEX).sum()]
        mtp_sums, mtp_counts = [], []
        for k in range(1, D + 1):
            ce = cross_entropy_sum(outputs[k], targets[..., k])
            loss = loss + self.mtp_weight * ce
            mtp_sums.append(ce.detach())
            mtp_counts.append((targets[..., k] != IGNORE_INDEX).sum())
        self._sums.append(torch.stack([t.to(torch.float64) for t in row + mtp_sums + mtp_counts]))
        return loss / self.tokens_per_step

    def sums(self, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's sums over the micro-batches so far, fp64, added in micro-batch order:
        lm_sum, lm_targets (scalars), mtp_sum, mtp_targets ([D]). Zeros where this rank
        computed no loss (the pipeline's other stages)."""
        D = self.mtp_depth
        total = torch.zeros(2 + 2 * D, dtype=torch.float64, device=device)
        for row in self._sums:
            total += row.to(device)
        return {"lm_sum": total[0], "lm_targets": total[1], "mtp_sum": total[2:2 + D],
                "mtp_targets": total[2 + D:]}


def loss_means(sums: Mapping[str, Sequence[float]], prefix: str = "") -> dict[str, float]:
    """{prefix + "loss": the LM loss's mean over its scored targets, prefix + "mtp_loss/<k>":
    MTP depth k's} from the token sums of `StepLoss.sums` summed over the ranks and read by the
    host (each name's values as a list: one for the scalars, D for the MTP depths)."""
    (lm,), (n,) = sums["lm_sum"], sums["lm_targets"]
    out = {f"{prefix}loss": lm / max(n, 1.0)}
    for k, (total, count) in enumerate(zip(sums["mtp_sum"], sums["mtp_targets"]), start=1):
        out[f"{prefix}mtp_loss/{k}"] = total / max(count, 1.0)
    return out


__all__ = ["StepLoss", "cross_entropy_sum", "loss_means"]
