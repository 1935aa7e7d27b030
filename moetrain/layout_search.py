"""The layouts of a world size that fit a GPU, ranked by the step-time model.

    results = search_layouts(cfg, world_size, gpu)     # list[Candidate], fastest first

Candidates: every tp (dividing the heads, within one node), cp (1, 2, 4, 8: dividing the
sequence), pp (dividing the world; layers split as evenly as the stages allow, one fewer on the
first and last stage, which hold the embedding / the output head), vpp (1, 2, 4: interleaved
1F1B when > 1), ep (dividing the experts), etp (1, 2) and train.recompute (none, moe, full) whose
degrees divide the world size and pass the checks training runs (`check_layout`); everything
else (batch, micro-batch, FSDP, dtype) is the config's. A candidate fits when its peak stage's
memory (`planning.rank_memory`) plus RESERVED_GIB is within the GPU's memory; the fitting ones
are ranked by `step_time.estimate_step`. Pure arithmetic: nothing is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from moetrain.hardware import Hardware
from moetrain.parallel.checks import check_layout
from moetrain.parallel.dims import LayoutError
from moetrain.planning import StageMemory, memory_per_rank
from moetrain.step_time import StepEstimate, estimate_step

#: GiB of a GPU's memory the planner leaves for the CUDA context, NCCL's buffers and the
#: allocator's fragmentation (docs/planning.md, "Fits").
RESERVED_GIB = 3.0
GIB = 2**30


def usable_bytes(gpu: Hardware) -> float:
    return (gpu.memory_gib - RESERVED_GIB) * GIB


def headroom(peak: StageMemory, gpu: Hardware) -> float:
    """Bytes left on the GPU at the stage's peak (negative: it does not fit)."""
    return usable_bytes(gpu) - peak.total


@dataclass
class Candidate:
    overrides: list[str]  # the parallel.* / train.recompute overrides of the layout
    cfg: Any
    dims: Any
    memory: list[StageMemory]
    estimate: Optional[StepEstimate]

    @property
    def peak(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.total)

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


def balanced_pp_layers(n_layers: int, stages: int) -> Optional[list[int]]:
    """Layers per virtual stage, as even as possible with the first and last stage (the
    embedding, the output head) taking the remainder's shortfall; None for an even split."""
    if n_layers % stages == 0:
        return None
    # the first and last stage carry the embedding / output head: give them one layer fewer
    counts = [n_layers // stages] * stages
    extra = n_layers - sum(counts)
    middle = list(range(1, stages - 1)) or list(range(stages))
    for i in range(extra):
        counts[middle[i % len(middle)]] += 1
    return counts if min(counts[1:-1] or [1]) >= 1 else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Any, world_size: int, gpu: Hardware) -> Iterator[tuple[list[str], Any]]:
    """(overrides, config) of every candidate layout that passes the layout checks."""
    model, moe = cfg.model, cfg.model.moe
    S = cfg.data.seq_len
    for pp in _divisors(world_size):
        if pp > model.n_layers:
            continue
        for vpp in ((1, 2, 4) if pp > 1 else (1,)):
            stages = pp * vpp
            if stages > model.n_layers:
                continue
            pp_layers = balanced_pp_layers(model.n_layers, stages) if stages > 1 else None
            if stages > 1 and model.n_layers % stages and pp_layers is None:
                continue
            schedule = "interleaved" if vpp > 1 else "1f1b"
            for tp in _divisors(world_size // pp):
                if tp > gpu.gpus_per_node or model.n_heads % tp:
                    continue
                for cp in (1, 2, 4, 8):
                    if (world_size // pp) % (tp * cp) or S % (2 * cp):
                        continue
                    for ep in _divisors(moe.num_experts):
                        if (world_size // pp) % ep:
                            continue
                        for etp in (1, 2):
                            if (world_size // pp) % (ep * etp) or moe.expert_hidden % etp:
                                continue
                            par = dataclasses.replace(
                                cfg.parallel, tp=tp, cp=cp, pp=pp, vpp=vpp, ep=ep, etp=etp,
                                pp_schedule=schedule if pp > 1 else cfg.parallel.pp_schedule,
                                pp_layers=pp_layers)
                            base = dataclasses.replace(cfg, parallel=par)
                            try:
                                check_layout(base, world_size)
                            except LayoutError:
                                continue
                            over = [f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.pp={pp}",
                                    f"parallel.ep={ep}", f"parallel.etp={etp}"]
                            if vpp > 1:
                                over += [f"parallel.vpp={vpp}", f"parallel.pp_schedule={schedule}"]
                            if pp_layers is not None:
                                over.append("parallel.pp_layers=[" + ",".join(map(str, pp_layers))
                                            + "]")
                            yield over, base


def search_layouts(cfg: Any, world_size: int, gpu: Hardware, recompute: tuple[str, ...] =
                   ("none", "moe", "full")) -> tuple[list[Candidate], int]:
    """(the layouts that fit, fastest first; how many were checked). Each layout is tried with
    the `recompute` modes in order and kept with the first that fits (recomputing costs time)."""
    fits: list[Candidate] = []
    checked = 0
    for over, base in candidate_layouts(cfg, world_size, gpu):
        from moetrain.parallel.dims import ParallelDims

        dims = ParallelDims.from_config(base.parallel, world_size)
        for mode in recompute:
            checked += 1
            c = dataclasses.replace(base, train=dataclasses.replace(base.train, recompute=mode))
            memory = memory_per_rank(c, dims)
            peak = max(m.total for m in memory)
            if peak > usable_bytes(gpu):
                continue
            extra = [] if mode == "none" else [f"train.recompute={mode}"]
            fits.append(Candidate(over + extra, c, dims, memory,
                                  estimate_step(c, dims, gpu, memory=memory)))
            break
    fits.sort(key=lambda cand: cand.estimate.step_s)
    return fits, checked


def format_search(cfg: Any, world_size: int, gpu: Hardware, results: list[Candidate],
                  checked: int, top: int) -> str:
    from moetrain.planning import gib
    from moetrain.plan_comm import step_collectives
    from moetrain.step_time import nodes_spanned

    lines = [f"search: {cfg.run.name} on {world_size} x {gpu.name} ({gpu.memory_gib:g} GiB, "
             f"{gpu.gpus_per_node} per node): {len(results)} of {checked} layouts fit "
             f"(peak memory + {RESERVED_GIB:g} GiB reserved <= the GPU's)"]
    if not results:
        lines.append("  none fits: add GPUs, shorten data.seq_len or train.micro_batch_size")
        return "\n".join(lines)
    lines.append(f"  {'#':>3} {'step':>9} {'tok/s/GPU':>10} {'MFU':>6} {'peak mem':>10} "
                 f"{'comm/step':>10} {'inter-node':>10}  layout")
    for i, cand in enumerate(results[:top], 1):
        est = cand.estimate
        slow = est.slowest
        calls = step_collectives(cand.cfg, cand.dims, slow.rank)
        total = sum(c.total_bytes for c in calls)
        inter = sum(c.total_bytes for c in calls
                    if c.size > 1 and nodes_spanned(c.ranks, gpu.gpus_per_node) > 1)
        lines.append(f"  {i:>3} {est.step_s:>8.2f}s {est.tokens_per_s_per_gpu:>10,.0f} "
                     f"{est.mfu:>6.1%} {gib(cand.peak.total):>10} {gib(total):>10} "
                     f"{gib(inter):>10}  {cand.label}")
    return "\n".join(lines)


__all__ = ["RESERVED_GIB", "Candidate", "balanced_pp_layers", "candidate_layouts", "format_search",
           "headroom", "search_layouts", "usable_bytes"]
