"""Validation loss, per source of the mixture and of the mixture as a whole.

Each source is evaluated on its own held-out sequences: the first `train.eval_batches` global
batches of its validation split, in order (fewer when the split is smaller; a source without
one whole global batch is left out, said once at the start). `val_loss/<source>` is the mean LM
loss over that source's target tokens; `val_loss` is the sources' losses weighted by their
mixture weights (renormalised over the evaluated sources), the expected loss on the mixture,
estimated with the same number of batches per source. With one source it is the mean over the
first `train.eval_batches` global batches, as before. Evaluating each source separately is what
OLMo's and Megatron's multiple validation sets do; batches of one source also keep every
layout's step runner (micro-batch loop, pipeline schedule) unchanged.

All sources' sums are reduced over the ranks together: one collective and one host read per
evaluation.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ContextManager

import torch

from moetrain.config import ConfigError
from moetrain.data.sampler import val_steps

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
        """{"val_loss": ..., "val_loss/<source>": ...} of `model` (in eval mode; back in train
        mode after). `runner`: the model's step runner (eval_sums, sum_over_tokens;
        moetrain/parallel/step.py)."""
        model.eval()
        sums = torch.zeros(len(self.steps), 2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for s, steps in enumerate(self.steps):
                for micro_batches in steps:
                    batches = [self.val_data.get_batch(indices).to(device)
                               for indices in micro_batches]
                    sums[s] += runner.eval_sums(model, batches, autocast).to(device)
        model.train()
        totals = runner.sum_over_tokens(sums).tolist()  # the evaluation's one host read
        losses = {name: loss_sum / targets for name, (loss_sum, targets) in zip(self.names, totals)}
        mixture = sum(w * losses[n] for n, w in zip(self.names, self.weights)) / sum(self.weights)
        return {"val_loss": mixture, **{f"val_loss/{n}": v for n, v in losses.items()}}


__all__ = ["Evaluator"]
