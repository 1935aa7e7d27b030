"""The trainer's one handle on the MoE layers' per-step state.

    control = MoEControl(model, cfg.model.moe, num_moe_layers=L, micro_batches_per_step=M,
                         eval_capacity_factor=cfg.train.eval_capacity_factor)
    routing = control.start_step(step)   # top-k and capacity factor of `step` (its schedules),
                                         # aux-loss scale 1/M, statistics and LBL counts cleared
    ... forward and backward of the step's micro-batches ...
    rows = control.step_stats()          # this rank's statistics rows, for the step's reduction
    control.finish_step(summed)          # after the optimizer step: the expert bias
    with control.evaluation(): ...       # evaluation capacity; the step's routing afterwards

Every value that changes between steps is written here and nowhere else (through
`MoELayer.start_step / configure / finish_step`); the schedules are pure functions of the step
(moe/schedule.py), so a resumed run sets the same values from the step counter alone. A rank that
holds none of the MoE layers (a pipeline stage of dense layers) still takes part: its rows are
zeros.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from moetrain.config.schema import MoEConfig
from moetrain.model.moe.layer import MoELayer, moe_layers
from moetrain.model.moe.schedule import capacity_factor_at, top_k_at
from moetrain.model.moe.stats import MoEStepStats, StatsColumns


@dataclass(frozen=True)
class StepRouting:
    """The routing settings of one optimizer step."""

    top_k: int
    capacity_factor: Optional[float]  # None: dropless


class MoEControl:
    """Sets, per optimizer step, what the MoE layers of `model` (this rank's part of it) compute.

    `num_moe_layers`: MoE layers of the whole model (the rows of the statistics);
    `micro_batches_per_step`: micro-batches of a step over all data-parallel ranks, each of whose
    aux losses gets the gradient 1 / micro_batches_per_step; `eval_capacity_factor`: the capacity
    factor while evaluating (None: dropless; `train.eval_capacity_factor`).
    """

    def __init__(self, model: nn.Module, cfg: MoEConfig, *, num_moe_layers: int,
                 micro_batches_per_step: int, eval_capacity_factor: Optional[float] = None,
                 device: Optional[torch.device] = None) -> None:
        self.layers: list[MoELayer] = moe_layers(model)
        self.cfg = cfg
        self.num_moe_layers = num_moe_layers
        self.aux_loss_scale = 1.0 / micro_batches_per_step
        self.eval_capacity_factor = eval_capacity_factor
        self.columns = StatsColumns.of(cfg)
        self.device = device or (self.layers[0].step_stats.device if self.layers
                                 else torch.device("cpu"))
        self.routing: Optional[StepRouting] = None  # the step started last

    def routing_at(self, step: int) -> StepRouting:
        """The schedules' values at optimizer step `step` (0-based: the step being trained)."""
        return StepRouting(top_k_at(self.cfg, step), capacity_factor_at(self.cfg, step))

    def start_step(self, step: int) -> StepRouting:
        """Before the first micro-batch of optimizer step `step`: its top-k and capacity factor,
        the aux-loss scale; the step's statistics and global-scope LBL counts cleared."""
        self.routing = self.routing_at(step)
        for layer in self.layers:
            layer.start_step(top_k=self.routing.top_k,
                             capacity_factor=self.routing.capacity_factor,
                             aux_loss_scale=self.aux_loss_scale)
        return self.routing

    def step_stats(self) -> Optional[MoEStepStats]:
        """This rank's statistics rows of the step so far, [num_moe_layers, width] float64 on
        the device: each layer's row at its `moe_index`, zeros for layers this rank does not
        hold, so the sum over every rank is the whole model's. None for a model without MoE
        layers."""
        if not self.num_moe_layers:
            return None
        rows_LC = torch.zeros(self.num_moe_layers, self.columns.width, dtype=torch.float64,
                              device=self.device)
        for layer in self.layers:
            rows_LC[layer.moe_index] = layer.step_stats
        return self.columns.view(rows_LC)

    def finish_step(self, summed: Optional[MoEStepStats]) -> None:
        """After the optimizer step: the aux-loss-free expert bias from the step's loads summed
        over every rank (`summed`, on the device; `model.moe.routing.bias_rate`, off at 0)."""
        if summed is None or self.cfg.routing.bias_rate <= 0:
            return
        loads_LE = summed.tokens_per_expert
        for layer in self.layers:
            layer.finish_step(loads_LE[layer.moe_index])

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Route at the evaluation capacity factor (the step's top-k) inside; the step's routing
        again afterwards. Statistics are recorded only by training forwards (`model.train()`)."""
        routing = self.routing or self.routing_at(0)
        for layer in self.layers:
            layer.configure(top_k=routing.top_k, capacity_factor=self.eval_capacity_factor)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.configure(top_k=routing.top_k, capacity_factor=routing.capacity_factor)


__all__ = ["MoEControl", "StepRouting"]
