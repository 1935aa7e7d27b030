"""Which transformer layers each pipeline stage holds (torch-free: the planner uses it too).

    split_layers(n_layers, pp, vpp, layers_per_stage)   layer ids of every virtual stage
    stage_indices(pp_rank, pp, vpp)                     the virtual stages of a pp rank
    rank_layers(...)                                    the layer ids a pp rank holds

Virtual stage s runs on pp rank s % pp, so rank r holds stages r, r + pp, ... ("looped"
placement, as torchtitan and Megatron-Core interleave; torch's interleaved schedules assume it).
The first virtual stage also holds the embedding, the last the final norm and output head.
"""

from __future__ import annotations

from typing import Optional, Sequence

from moetrain.parallel.dims import LayoutError


def split_layers(n_layers: int, pp: int, vpp: int = 1,
                 layers_per_stage: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The layer ids of each of the pp * vpp virtual stages, in pipeline order (contiguous).

    layers_per_stage (`parallel.pp_layers`): layer counts per virtual stage, summing to n_layers;
    the first and last stage may hold 0 layers (they carry the embedding / the output head), the
    others at least 1. None: the even split (pp * vpp must divide n_layers).
    Raises LayoutError naming the keys.
    """
    stages = pp * vpp
    if layers_per_stage is None:
        if n_layers % stages:
            raise LayoutError(
                f"model.n_layers = {n_layers} is not divisible by parallel.pp*parallel.vpp = "
                f"{pp}*{vpp} = {stages}; set parallel.pp_layers to split them unevenly",
                ("model.n_layers", "parallel.pp", "parallel.vpp"))
        counts = [n_layers // stages] * stages
    else:
        counts = [int(c) for c in layers_per_stage]
        if len(counts) != stages:
            raise LayoutError(
                f"parallel.pp_layers = {counts} has {len(counts)} entries; "
                f"parallel.pp*parallel.vpp = {pp}*{vpp} = {stages} stages need one each",
                ("parallel.pp_layers", "parallel.pp", "parallel.vpp"))
        if sum(counts) != n_layers:
            raise LayoutError(
                f"parallel.pp_layers = {counts} sums to {sum(counts)}, "
                f"model.n_layers = {n_layers}", ("parallel.pp_layers", "model.n_layers"))
        for s, c in enumerate(counts):
            if c < (0 if s in (0, stages - 1) else 1):
                raise LayoutError(
                    f"parallel.pp_layers = {counts} gives stage {s} {c} layers; a middle "
                    "stage needs at least one and none may be negative", ("parallel.pp_layers",))
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def stage_indices(pp_rank: int, pp: int, vpp: int = 1) -> list[int]:
    """The virtual stages of a pp rank: pp_rank + v * pp for v < vpp (looped placement)."""
    return [pp_rank + v * pp for v in range(vpp)]


def rank_layers(n_layers: int, pp_rank: int, pp: int, vpp: int = 1,
                layers_per_stage: Optional[Sequence[int]] = None) -> list[int]:
    """The layer ids pp rank `pp_rank` holds, over all its virtual stages, ascending."""
    split = split_layers(n_layers, pp, vpp, layers_per_stage)
    return sorted(i for s in stage_indices(pp_rank, pp, vpp) for i in split[s])


__all__ = ["rank_layers", "split_layers", "stage_indices"]
