"""This pp rank's pipeline stages, cut from the plain model.

    build_stage_modules(model, pp_rank, pp, vpp, layers_per_stage)  -> [StageModule]
    RankModel(stage_modules)  the rank's stages as one module with the full model's names

A stage is the model's shell (config and flags, copied) holding only its layers, moved out of
the model (keys of `layers` unchanged, so parameter names equal the full model's),
`tok_embeddings` only on the first stage, `norm` and `output` only on the last (None
elsewhere). The model is consumed: it keeps none of the parts, and every part no stage of this
rank holds is dropped with it (the trainer builds on the meta device, so nothing was
allocated). Tied embeddings are refused for pp * vpp > 1: the first and last stage would hold
separate copies of one weight whose gradients must be summed (`check_layout` says so before
any process starts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from moetrain.parallel.pipeline.split import split_layers, stage_indices


@dataclass
class StageModule:
    """One virtual stage of this rank: its index, its layers and its module."""

    index: int
    num_stages: int
    layer_ids: list[int]
    module: nn.Module

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def build_stage_modules(
    model: nn.Module, pp_rank: int, pp: int, vpp: int = 1,
    layers_per_stage: Optional[Sequence[int]] = None,
) -> list[StageModule]:
    """This rank's stages of a plain `Transformer`, in stage order. `model` is consumed: its
    parts move into the stages (no copies) and it is left with no layers, embedding, norm or
    output head."""
    assert 0 <= pp_rank < pp, (pp_rank, pp)
    n_layers, num_stages = len(model.layers), pp * vpp
    split = split_layers(n_layers, pp, vpp, layers_per_stage)
    keys = list(model.layers.keys())
    stages = [
        StageModule(s, num_stages, split[s],
                    _take_stage(model, [keys[i] for i in split[s]], s == 0, s == num_stages - 1))
        for s in stage_indices(pp_rank, pp, vpp)
    ]
    model.layers = nn.ModuleDict()
    model.tok_embeddings = model.norm = model.output = None
    return stages


class RankModel(nn.Module):
    """This rank's stages as one module with the full model's parameter names and order
    (tok_embeddings, layers.<id>..., norm, output; absent parts None) - the modules are the
    stages' own, not copies. Hand it to what takes "the model": the optimizer, the checkpoint
    state dicts (keys match any other layout's), gradient clipping, train()/eval(). It has no
    forward: the schedule runs the stages."""

    def __init__(self, stage_modules: Sequence[StageModule]) -> None:
        super().__init__()
        first = next((s.module for s in stage_modules if s.is_first), None)
        last = next((s.module for s in stage_modules if s.is_last), None)
        self.tok_embeddings = first.tok_embeddings if first is not None else None
        self.layers = nn.ModuleDict()
        for sm in sorted(stage_modules, key=lambda s: s.index):
            for key, block in sm.module.layers.items():
                self.layers[key] = block
        self.norm = last.norm if last is not None else None
        self.output = last.output if last is not None else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline's stages run through its schedule, not RankModel")


def _take_stage(model: nn.Module, keep: list[str], first: bool, last: bool) -> nn.Module:
    """A copy of `model`'s shell holding its layers `keep` (and the embedding / norm and output
    head on the first / last stage): the parts are moved, not copied."""
    parts = {name: getattr(model, name) for name in ("layers", "tok_embeddings", "norm", "output")}
    try:
        model.layers = nn.ModuleDict()
        model.tok_embeddings = model.norm = model.output = None
        stage = copy.deepcopy(model)  # the shell: no parameters left to copy
    finally:
        for name, value in parts.items():
            setattr(model, name, value)
    stage.layers = nn.ModuleDict({key: parts["layers"][key] for key in keep})
    if first:
        stage.tok_embeddings = parts["tok_embeddings"]
    if last:
        stage.norm, stage.output = parts["norm"], parts["output"]
    return stage


__all__ = ["RankModel", "StageModule", "build_stage_modules"]
