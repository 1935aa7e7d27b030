"""The trainer's one handle on the MoE layers' per-step state.

    control = MoEControl(model, cfg.model.moe, num_moe_layers=L, micro_batches_per_step=M,
                         eval_capacity_factor=cfg.train.eval_capacity_factor)
    routing = control.start_step(step)   # top-k and capacity factor of `step` (its schedules),
                                         # aux-loss scale 1/M, statistics and LBL counts cleared
    ... forward and backward of the step's micro-batches ...
    rows = control.step_stats()          # this rank's statistics rows, for the step's reduction
    sums, per_rank = control.exchange_sums()   # the sync-free exchange's counters (ep_budget)
    if control.exchange_overflowed(summed):    # after the reduction: redo the step (the trainer
        ...                                    # decides), the budget has grown
    control.finish_step(summed)          # after the optimizer step: the expert bias
    with control.evaluation(): ...       # evaluation capacity, exact-size exchange; the step's
                                         # routing afterwards

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
from moetrain.model.moe.budget import ExchangeBudget
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
        # The sync-free exchange's receive budget (model.moe.ep_budget; moe/budget.py).
        self.budget = None if cfg.ep_budget is None else ExchangeBudget(cfg.ep_budget)
        self.attempt_budget: Optional[float] = None  # the budget of the attempt started last
        self.redos = 0  # attempts of the current step that overflowed
        self.last_need = self.last_wasted = 0.0  # the last attempt's reduced counters

    def routing_at(self, step: int) -> StepRouting:
        """The schedules' values at optimizer step `step` (0-based: the step being trained)."""
        return StepRouting(top_k_at(self.cfg, step), capacity_factor_at(self.cfg, step))

    def start_step(self, step: int) -> StepRouting:
        """Before the first micro-batch of optimizer step `step`: its top-k and capacity factor,
        the aux-loss scale; the step's statistics and global-scope LBL counts cleared."""
        self.routing = self.routing_at(step)
        self.attempt_budget = None if self.budget is None else self.budget.factor
        for layer in self.layers:
            layer.start_step(top_k=self.routing.top_k,
                             capacity_factor=self.routing.capacity_factor,
                             aux_loss_scale=self.aux_loss_scale, ep_budget=self.attempt_budget)
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

    def exchange_sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This rank's sync-free exchange counters of the attempt, for the step's reduction:
        (sums: "ep_overflow" forwards that overflowed the budget, "ep_rows" rows received,
        "ep_slots" receive-buffer rows; per_rank: "ep_need", the largest need as a factor of the
        balanced load). Both empty without `model.moe.ep_budget`; zeros on a rank without MoE
        layers. Device scalars (float64): nothing is read."""
        if self.budget is None:
            return {}, {}
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)
        for layer in self.layers:
            s = layer.exchange_stats
            stats = torch.stack([stats[0] + s[0], torch.maximum(stats[1], s[1]),
                                 stats[2] + s[2], stats[3] + s[3]])
        return ({"ep_overflow": stats[0], "ep_rows": stats[2], "ep_slots": stats[3]},
                {"ep_need": stats[1]})

    def exchange_overflowed(self, summed) -> bool:
        """After the step's reduction (`summed`: its named sums, with `exchange_sums`' names,
        read through `item(name)` and `maximum(name)` - moetrain.parallel.reduction.StepSums):
        True when the attempt overflowed the budget on some rank - the step's results are not
        the dropless ones and it must be redone; the budget has grown to cover it
        (`ExchangeBudget`). False without a budget."""
        if self.budget is None:
            return False
        self.last_need = summed.maximum("ep_need")
        self.last_wasted = summed.item("ep_slots") - summed.item("ep_rows")
        redo = self.budget.after_attempt(overflowed=summed.item("ep_overflow") > 0,
                                         need=self.last_need)
        self.redos = self.redos + 1 if redo else self.redos
        return redo

    def exchange_record(self) -> dict[str, float]:
        """The metrics of the step's kept attempt (call after `exchange_overflowed` returned
        False; empty without a budget): ep_budget (its factor), ep_need, ep_overflows
        (attempts of the step redone), ep_wasted_rows (padding rows received, over every rank,
        layer and micro-batch). Starts the count of redos afresh."""
        if self.budget is None:
            return {}
        record = {"ep_budget": self.attempt_budget, "ep_need": self.last_need,
                  "ep_overflows": self.redos, "ep_wasted_rows": self.last_wasted}
        self.redos = 0
        return record

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
        """Route at the evaluation capacity factor (the step's top-k) and exchange exact sizes
        (an overflow there could not be redone) inside; the step's routing and budget again
        afterwards. Statistics are recorded only by training forwards (`model.train()`)."""
        routing = self.routing or self.routing_at(0)
        for layer in self.layers:
            layer.configure(top_k=routing.top_k, capacity_factor=self.eval_capacity_factor)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.configure(top_k=routing.top_k, capacity_factor=routing.capacity_factor,
                                ep_budget=self.attempt_budget)


__all__ = ["MoEControl", "StepRouting"]
