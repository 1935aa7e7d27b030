"""A dry run of any rank of any world size in one CPU process: the real parallelized model, built
on the meta device under a fake process group, checked against the planner.

    report = dry_run(cfg, dims)        # DryRun: per role, built vs planned; .ok

For one rank of every role of the layout - every rank of a pipeline stage whose planned
holding (each tensor's elements held and allocated, `plan_shards.rank_units`) differs from the
stage's ranks before it, and the stage's last rank: uneven vocabulary or FSDP shards give a TP
coordinate or a shard position its own role - the model is built exactly as training builds it
(`build_parallel_model`: `Transformer` on the meta device, then the trainer's own
`parallelize(model, rank, cfg.parallel, batch)` under `init_process_group("fake")`), nothing
is allocated, and:

- every parameter tensor the rank holds is compared with `plan_shards` (elements held,
  elements of its storage - FSDP2's padded shard - and name); the stage's parameters and bytes of
  weights, gradients and optimizer states with `planning.rank_memory`. Gradients and AdamW's
  states are not built (no step runs): they follow from the built shards (FSDP2 reduces into
  padded shards, AdamW allocates the unpadded ones; tests/distributed/test_initialisation.py
  measures both on real ranks). A difference is an error.
- the collectives of one training step are counted from the code's own plan as built: each
  FSDP unit from the built FSDP2 modules (their parameters' padded shards and mesh; a
  replicated unit, on a (replicate, shard = 1) mesh, all-reduces its gradient) and, under
  pipeline parallelism, the schedule's real action order; the activation collectives (tensor,
  context and expert parallelism, pipeline sends, load-balancing counts, the step's reduction)
  by `plan_comm`'s per-call rules, which tests/distributed/test_plan_collectives.py checks
  against a recorded real step. The count is compared with the planner's per (op, group).

Counting rather than running the step under the fake group: the step's communication depends
on the data (expert-parallel splits are read on the host from the routing), which meta tensors
do not have, and running the real compute of a frontier layer on a CPU is out of reach.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moetrain.parallel.dims import ParallelDims
from moetrain.parallel.checks import fsdp_reshards_after_forward
from moetrain.plan_comm import Collective, by_op_and_group, micro_batches, step_collectives
from moetrain.plan_shards import rank_units
from moetrain import planning
from moetrain.planning import GRAD_BYTES, WEIGHT_BYTES, rank_memory


def build_parallel_model(cfg: Any, dims: ParallelDims) -> tuple[nn.Module, Any]:
    """The one call into the parallel build: this rank's model as the trainer builds it
    (`parallelize` of the meta-device `Transformer`), left on the meta device (nothing
    allocated), and its step runner (under PP its `pipe` holds the stages and the schedule).
    Needs an initialised (fake) default process group of dims.world_size ranks."""
    from moetrain.model.transformer import Transformer
    from moetrain.parallel.parallelize import BatchShape, parallelize
    from moetrain.parallel.rank import RankLayout

    t = cfg.train
    # The meshes as on CPU ranks, the rank's device meta: parallelize allocates nothing there.
    cpu = RankLayout.create(dims, torch.device("cpu"))
    rank = dataclasses.replace(cpu, device=torch.device("meta"))
    batch = BatchShape(t.micro_batch_size, micro_batches(cfg, dims), cfg.data.seq_len)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return parallelize(model, rank, cfg.parallel, batch, compile=False)


@dataclass
class BuiltParam:
    name: str
    held: int  # elements of the rank's local shard
    allocated: int  # elements of its storage (FSDP2's padded shard)


@dataclass
class RoleReport:
    rank: int
    stage: int
    built: dict[str, BuiltParam]
    planned: dict[str, tuple[int, int]]  # name -> (held, allocated)
    memory: dict[str, tuple[float, float]]  # key -> (built, planned) bytes or elements
    comm_built: dict[tuple[str, tuple[int, ...]], tuple[int, int]]
    comm_planned: dict[tuple[str, tuple[int, ...]], tuple[int, int]]
    calls: list[Collective]
    notes: list[str] = field(default_factory=list)

    @property
    def param_errors(self) -> list[str]:
        errors = []
        for name in sorted(set(self.built) | set(self.planned)):
            b, p = self.built.get(name), self.planned.get(name)
            if b is None:
                errors.append(f"{name}: planned {p[0]} elements, not built")
            elif p is None:
                errors.append(f"{name}: built ({b.held} elements), not planned")
            elif (b.held, b.allocated) != p:
                errors.append(f"{name}: built {b.held} held / {b.allocated} allocated elements, "
                              f"planned {p[0]} / {p[1]}")
        for key, (b, p) in self.memory.items():
            if b != p:
                errors.append(f"stage {self.stage} {key}: built {b:.0f}, planned {p:.0f}")
        return errors

    @property
    def comm_errors(self) -> list[str]:
        out = []
        for key in sorted(set(self.comm_built) | set(self.comm_planned)):
            b, p = self.comm_built.get(key, (0, 0)), self.comm_planned.get(key, (0, 0))
            if b != p:
                out.append(f"{key[0]} over ranks {_short(key[1])}: counted {b[0]} calls / {b[1]} B, "
                           f"planned {p[0]} / {p[1]} B")
        return out


@dataclass
class DryRun:
    dims: ParallelDims
    roles: list[RoleReport]
    exact_schedule: bool  # False: the planner's FSDP all-gather count is an estimate here

    @property
    def ok(self) -> bool:
        comm_ok = all(not r.comm_errors for r in self.roles) or not self.exact_schedule
        return all(not r.param_errors for r in self.roles) and comm_ok


def _short(ranks: tuple[int, ...]) -> str:
    if len(ranks) <= 6:
        return "[" + ",".join(map(str, ranks)) + "]"
    return f"[{ranks[0]},{ranks[1]},...,{ranks[-1]}] ({len(ranks)})"


def role_ranks(cfg: Any, dims: ParallelDims) -> list[int]:
    """The ranks to build (module docstring): in every pipeline stage, the first rank of each
    distinct planned holding, and the stage's last rank. Ascending. The planner's holdings of
    every rank are arithmetic (~1 s for DeepSeek-V3 at 2,048 ranks on one CPU core)."""
    out: set[int] = set()
    seen: set[tuple] = set()
    for r in range(dims.world_size):
        held = tuple((p.held, p.allocated) for u in rank_units(cfg, dims, r) for p in u.params)
        key = (dims.dense_coord(r).pp, held)
        if key not in seen:
            seen.add(key)
            out.add(r)
    per_stage = dims.world_size // dims.pp
    out.update((s + 1) * per_stage - 1 for s in range(dims.pp))
    return sorted(out)


def _built_params(model: nn.Module) -> dict[str, BuiltParam]:
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        allocated = local.untyped_storage().nbytes() // local.element_size()
        out[name] = BuiltParam(name, local.numel(), allocated)
    return out


def _fsdp_units(model: nn.Module) -> list[tuple[Any, int, tuple[int, ...], bool]]:
    """(module, all-gather output elements, ranks its gradients are reduced over, replicated)
    of every FSDP2 unit under `model`. A replicated unit's mesh is 2-D (replicate, shard) with
    a shard dimension of 1: its all-gather output is its own storage."""
    from torch.distributed.fsdp import FSDPModule

    units, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        group = state._fsdp_param_group
        if group is None or id(state) in seen:  # modules sharded together share one state
            continue
        seen.add(id(state))
        mesh = group.mesh_info.mesh
        ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
        replicated = mesh.ndim == 2
        shard = mesh.size(-1)
        gathered = sum(fp._sharded_param_data.numel() for fp in group.fsdp_params) * shard
        units.append((module, gathered, ranks, replicated))
    return units


def _all_gathers_by_order(actions: list[str], root: bool) -> int:
    """FSDP all-gathers of one unit of a stage over its actions (F, B, I, W), as torch's stages
    drive FSDP2: a unit is resharded after each forward (a root, or any unit not resharded
    after forward, is not), kept gathered after a backward; a forward or backward on a
    resharded unit gathers it."""
    gathers, sharded = 0, True
    for a in actions:
        if a in ("F", "B", "I"):
            if sharded:
                gathers += 1
                sharded = False
            if a == "F" and not root:
                sharded = True
    return gathers


def _schedule_actions(runner: Any, pp_rank: int) -> dict[int, list[str]]:
    """{stage index: [computation type, ...]} of this rank's pipeline order (F, B, I, W)."""
    order = getattr(runner.pipe.schedule, "pipeline_order", None)
    if not order:
        return {}
    out: dict[int, list[str]] = defaultdict(list)
    for action in order.get(pp_rank, []):
        if action is None:
            continue
        kind = getattr(action.computation_type, "value", str(action.computation_type))
        if kind in ("F", "B", "I", "W"):
            out[action.stage_index].append(kind)
    return out


def _built_collectives(cfg, dims, model, runner, rank, planned: list[Collective]) -> list[Collective]:
    """The step's collectives counted from the built model (module docstring)."""
    m = micro_batches(cfg, dims)
    out = [c for c in planned if c.what not in ("fsdp", "replicated grads")]
    actions = _schedule_actions(runner, dims.dense_coord(rank).pp) if dims.pp > 1 else {}
    stage_of: dict[int, int] = {}
    if dims.pp > 1:
        for sm in runner.pipe.stage_modules:
            for module in sm.module.modules():
                stage_of[id(module)] = sm.index
    kinds = {tuple(dims.group_of(k, rank)): k for k in ("edp", "dp_cp_tp", "dp_cp")}
    roots = [model] if dims.pp == 1 else [sm.module for sm in runner.pipe.stage_modules]
    for module, gathered, ranks, replicated in (u for r in roots for u in _fsdp_units(r)):
        nbytes = gathered * WEIGHT_BYTES
        if gathered == 0:
            continue
        if replicated:  # one all-reduce of the whole gradient, even over one rank
            out.append(Collective("all_reduce", kinds[ranks], ranks, nbytes, 1,
                                  "replicated grads"))
            continue
        if len(ranks) == 1:
            continue
        # a stage root, or any unit when the layout keeps them gathered after forward
        root = any(module is r for r in roots) or not fsdp_reshards_after_forward(cfg.parallel)
        if dims.pp == 1:
            gathers = m if root else 2 * m
        else:
            gathers = _all_gathers_by_order(actions.get(stage_of[id(module)], []), root)
        out.append(Collective("all_gather", kinds[ranks], ranks, nbytes, gathers, "fsdp"))
        out.append(Collective("reduce_scatter", kinds[ranks], ranks, nbytes, 1, "fsdp"))
    return out


def dry_run_rank(cfg: Any, dims: ParallelDims, rank: int) -> RoleReport:
    """Build `rank`'s model under a fake process group and compare it with the planner."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        model, runner = build_parallel_model(cfg, dims)
        built = _built_params(model)
        planned_calls = step_collectives(cfg, dims, rank)
        built_calls = _built_collectives(cfg, dims, model, runner, rank, planned_calls)
    finally:
        dist.destroy_process_group()
    units = rank_units(cfg, dims, rank)
    planned = {name: (p.held, p.allocated) for u in units for name, p in zip(u.names(), u.params)}
    specs = {name: p.spec for u in units for name, p in zip(u.names(), u.params)}
    optim = getattr(cfg, "optim", None)
    # The state's bytes per element depend on the tensor (by its planned spec); a built tensor
    # the planner lacks is reported by name below.
    optim_bytes = sum(b.held * planning.optimizer_state_bytes(optim, specs[n])
                      for n, b in built.items() if n in specs)
    mem = rank_memory(cfg, dims, rank)
    held = sum(b.held for b in built.values())
    allocated = sum(b.allocated for b in built.values())
    memory = {
        "parameters": (float(held), mem.dense_params + mem.expert_params),
        "weight bytes": (float(WEIGHT_BYTES * allocated), mem.weights),
        "gradient bytes": (float(GRAD_BYTES * allocated), mem.grads),
        "optimizer bytes": (float(optim_bytes), mem.optimizer),
    }
    return RoleReport(rank, dims.dense_coord(rank).pp, built, planned, memory,
                      by_op_and_group(built_calls), by_op_and_group(planned_calls), built_calls)


def dry_run(cfg: Any, dims: ParallelDims) -> DryRun:
    """`dry_run_rank` for every role (`role_ranks`)."""
    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without a process group")
    roles = [dry_run_rank(cfg, dims, r) for r in role_ranks(cfg, dims)]
    exact = dims.pp == 1 or cfg.parallel.pp_schedule in ("1f1b", "gpipe")
    return DryRun(dims, roles, exact)


def format_dry_run(run: DryRun) -> str:
    gib = 2.0**30
    lines = [f"dry run: {run.dims}; built on the meta device under a fake process group", "",
             f"  {'rank':>6}{'stage':>6}{'tensors':>9}{'parameters':>16}{'weights':>12}"
             f"{'grads':>12}{'optimizer':>12}  vs planner"]
    for r in run.roles:
        mem = r.memory
        same = "equal" if not r.param_errors else f"{len(r.param_errors)} DIFFERENCES"
        lines.append(
            f"  {r.rank:>6}{r.stage:>6}{len(r.built):>9}{mem['parameters'][0]:>16,.0f}"
            f"{mem['weight bytes'][0] / gib:>9.2f} GiB{mem['gradient bytes'][0] / gib:>8.2f} GiB"
            f"{mem['optimizer bytes'][0] / gib:>8.2f} GiB  {same}")
        lines += [f"      {e}" for e in r.param_errors[:20]]
    lines += ["", "collectives of one step (per rank; the data-parallel ones counted from the "
              "built FSDP units and the schedule's order, the activation ones by the planner's "
              "per-call rules, which tests/distributed/test_plan_collectives.py checks against "
              "recorded real steps):"]
    for r in run.roles:
        per_what: dict[tuple[str, str, int], list[int]] = defaultdict(lambda: [0, 0])
        for c in r.calls:
            agg = per_what[(c.what, c.op, c.size)]
            agg[0] += c.count
            agg[1] += c.total_bytes
        total = sum(b for _, b in per_what.values())
        lines.append(f"  rank {r.rank} (stage {r.stage}): {sum(n for n, _ in per_what.values())} "
                     f"calls, {total / gib:.2f} GiB")
        for (what, op, size), (n, b) in sorted(per_what.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"      {what:<26} {op:<15} over {size:>5} ranks {n:>7} x  "
                         f"{b / max(n, 1) / 2**20:>10.2f} MiB = {b / gib:>8.2f} GiB")
        errors = r.comm_errors
        if errors and run.exact_schedule:
            lines += ["      DIFFERS from the planner:"] + [f"        {e}" for e in errors[:10]]
        elif errors:
            lines += ["      (the planner's FSDP all-gather count is an estimate for this "
                      "schedule; the count above is the schedule's real order):"]
            lines += [f"        {e}" for e in errors[:10]]
        else:
            lines.append("      data-parallel collectives equal to the planner's, per op and group")
    lines.append("")
    lines.append("dry run: OK, every role's parameters, bytes and data-parallel collectives "
                 "equal the planner's" if run.ok else
                 "dry run: FAILED, the built model differs from the planner")
    return "\n".join(lines)


__all__ = ["DryRun", "RoleReport", "build_parallel_model", "dry_run", "dry_run_rank",
           "format_dry_run", "role_ranks"]

