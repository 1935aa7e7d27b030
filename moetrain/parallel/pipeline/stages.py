"""This pp rank's pipeline stages, cut from the plain model.

    build_stage_modules(model, pp_rank, pp, vpp, layers_per_stage)  -> [StageModule]
    RankModel(stage_modules)  the rank's stages as one module with the full model's names

A stage is the model's shell (config and flags, copied) holding only its layers, moved out of
the model (keys of `layers` unchanged, so parameter names equal the full model's),
`tok_embeddings` on the first stage, `norm`, `output` and the multi-token-prediction modules
`mtp` only on the last (None elsewhere). The model is consumed: it keeps none of the parts, and
every part no stage of this rank holds is dropped with it (the trainer builds on the meta
device, so nothing was allocated).

The shared embedding. The MTP modules embed tokens with the main model's embedding, and a tied
output head is that embedding: then the last stage holds a copy of `tok_embeddings` too (the
same name, so the same initial values, checkpoint entry and optimizer treatment) and a tied
head is tied to the copy. The two copies stay equal because their gradients are summed after
every step's backward, over the first and last stage of each (dp, cp, tp) coordinate, before
anything reads them (`PipelineStepRunner`, moetrain/parallel/step.py): each then holds the
gradient of the one shared weight, and the optimizer moves both alike. The gradient norm
counts the weight once (the last stage's copy is left out of it). Megatron-LM keeps its shared
embedding the same way (its "embedding group").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from moetrain.parallel.pipeline.split import split_layers, stage_indices


def last_stage_embeds(model_cfg) -> bool:
    """Whether the last pipeline stage needs the embedding too (multi-token prediction, or an
    output head tied to the embedding)."""
    return bool(model_cfg.tie_embeddings) or model_cfg.mtp.depth > 0


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
    parts move into the stages (no copies, but the last stage's copy of a shared embedding:
    module docstring) and it is left with no layers, embedding, norm, output head or MTP
    modules."""
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
    model.tok_embeddings = model.norm = model.output = model.mtp = None
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
        holder = first if first is not None else last  # the last stage's copy (shared)
        self.tok_embeddings = holder.tok_embeddings if holder is not None else None
        self.layers = nn.ModuleDict()
        for sm in sorted(stage_modules, key=lambda s: s.index):
            for key, block in sm.module.layers.items():
                self.layers[key] = block
        self.norm = last.norm if last is not None else None
        self.output = last.output if last is not None else None
        self.mtp = last.mtp if last is not None else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline's stages run through its schedule, not RankModel")


def _take_stage(model: nn.Module, keep: list[str], first: bool, last: bool) -> nn.Module:
    """A copy of `model`'s shell holding its layers `keep` (and the embedding on the first
    stage, norm, output head and MTP modules on the last): the parts are moved, not copied -
    but for the last stage's copy of a shared embedding when it is not also the first."""
    names = ("layers", "tok_embeddings", "norm", "output", "mtp")
    parts = {name: getattr(model, name) for name in names}
    try:
        model.layers = nn.ModuleDict()
        model.tok_embeddings = model.norm = model.output = model.mtp = None
        stage = copy.deepcopy(model)  # the shell: no parameters left to copy
    finally:
        for name, value in parts.items():
            setattr(model, name, value)
    stage.layers = nn.ModuleDict({key: parts["layers"][key] for key in keep})
    stage.embeds_input = first
    if first:
        stage.tok_embeddings = parts["tok_embeddings"]
    if last:
        stage.norm, stage.output, stage.mtp = parts["norm"], parts["output"], parts["mtp"]
        if not first and last_stage_embeds(model.cfg):
            stage.tok_embeddings = copy.deepcopy(parts["tok_embeddings"])
            if model.cfg.tie_embeddings:
                stage.output.weight = stage.tok_embeddings.weight
    return stage


__all__ = ["RankModel", "StageModule", "build_stage_modules", "last_stage_embeds"]
