"""Validation loss, per source of the mixture and of the mixture as a whole.

Each source is evaluated on its own held-out sequences: the first `train.eval_batches` global
batches of its validation split, in order (fewer when the split is smaller; a source without
one whole global batch is left out, said once at the start). `val_loss/<source>` is the mean LM
loss over that source's scored target tokens (docs/documents.md); `val_loss` is the sources'
losses weighted by their mixture weights (renormalised over the evaluated sources), the
expected loss on the mixture, estimated with the same number of batches per source. With one
source it is the mean over the first `train.eval_batches` global batches, as before. With
multi-token prediction, `val_mtp_loss/<k>` is depth k's loss mixed the same way (docs/mtp.md).
Evaluating each source separately is what OLMo's and Megatron's multiple validation sets do;
batches of one source also keep every layout's step runner (micro-batch loop, pipeline
schedule) unchanged.

All sources' sums are reduced over the ranks together: one collective and one host read per
evaluation.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ContextManager

import torch

from moetrain.config import ConfigError
from moetrain.data.sampler import val_steps
from moetrain.parallel.loss import loss_means

log = logging.getLogger(__name__)


class Evaluator:
    """The fixed evaluation batches of this rank and how to sum their losses (module doc)."""

    def __init__(self, val_data: Any, cfg: Any, dp_rank: int, dp_size: int,
                 announce: bool = False) -> None:
        """`val_data`: the MixtureDataset of the validation splits (None: no evaluation);
        `cfg`: the run's config. ConfigError when no source gives one global batch."""
        t = cfg.train
        G = t.global_batch_size
        self.val_data = val_data
        self.names: list[str] = []
        self.weights: list[float] = []
        # per evaluated source: its global batches, each this rank's micro-batches of indices
        self.steps: list[list[list[list[int]]]] = []
        if t.eval_every <= 0:
            return
        sizes = [] if val_data is None else val_data.sizes
        too_small = []
        for s, n in enumerate(sizes):
            if n < G:
                too_small.append(f"{val_data.names[s]} ({n})")
                continue
            offset = int(val_data.offsets[s])
            steps = val_steps(n, t.eval_batches, G, t.micro_batch_size, dp_rank, dp_size)
            self.steps.append([[[offset + i for i in mb] for mb in step] for step in steps])
            self.names.append(val_data.names[s])
            self.weights.append(val_data.weights[s])
        if not self.steps:
            raise ConfigError(
                f"train.eval_every={t.eval_every}: no source's validation split gives one global "
                f"batch of train.global_batch_size={G} sequences of data.seq_len="
                f"{cfg.data.seq_len} (validation sequences per source: "
                f"{', '.join(too_small) or 'none'}); raise data.val_fraction (more data per "
                "source) or set train.eval_every=0")
        if too_small and announce:
            log.warning("validation: no val_loss/<source> for %s: fewer validation sequences "
                        "than one global batch (%d); they are left out of val_loss",
                        ", ".join(too_small), G)

    def __call__(self, model: torch.nn.Module, runner: Any,
                 autocast: Callable[[], ContextManager], device: torch.device) -> dict[str, float]:
        """{"val_loss": ..., "val_loss/<source>": ..., "val_mtp_loss/<k>": ...} of `model` (in
        eval mode; back in train mode after). `runner`: the model's step runner (eval_sums,
        sum_over_tokens; moetrain/parallel/step.py). The MTP depths' losses (docs/mtp.md) are
        mixed over the sources with the same weights as `val_loss`."""
        model.eval()
        rows = []  # per source: its token sums (StepLoss.sums) in one vector
        with torch.no_grad():
            for steps in self.steps:
                row = None
                for micro_batches in steps:
                    batches = [self.val_data.get_batch(indices).to(device)
                               for indices in micro_batches]
                    sums = runner.eval_sums(model, batches, autocast)
                    names = list(sums)
                    flat = torch.cat([sums[n].reshape(-1).to(device) for n in names])
                    row = flat if row is None else row + flat
                rows.append(row)
        model.train()
        sizes = [sums[n].numel() for n in names]
        table = runner.sum_over_tokens({"eval": torch.stack(rows)})["eval"]
        totals = table.tolist()  # the evaluation's one host read
        per_source = {}
        for name, values in zip(self.names, totals):
            cut, at = {}, 0
            for n, size in zip(names, sizes):
                cut[n], at = values[at:at + size], at + size
            per_source[name] = loss_means(cut, "val_")
        mixed = {key: sum(w * per_source[n][key] for n, w in zip(self.names, self.weights))
                 / sum(self.weights) for key in per_source[self.names[0]]}
        return {**mixed, **{f"val_loss/{n}": v["val_loss"] for n, v in per_source.items()}}

__all__ = ["Evaluator"]
