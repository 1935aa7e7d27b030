"""The equivalence harness: the real `Trainer` on forked gloo ranks against one process
(docs/design.md, "Numerical equivalence").

    layouts = {"tp2": ["parallel.tp=2"], "dp2-replicated": ["parallel.fsdp.enabled=false"]}
    runs = run_layouts(2, layouts, tmp_path)      # runs.records = {name: [record of step 1..K]}
    reference = run_layouts(1, {"single": []}, tmp_path).records["single"]
    compare(runs.records["tp2"], reference)

    TWO_RANKS = {"tp2": Layout(("parallel.tp=2",))}      # over the "b4" reference (REFERENCES)
    two_ranks = layouts_fixture(2, TWO_RANKS)            # the module's 2-rank launch, a fixture
    check_case(two_ranks, "tp2", TWO_RANKS["tp2"], references)  # references: conftest.py

Every layout runs K optimizer steps of the tiny experiment (tests/harness) in fp32 with
deterministic algorithms, dropless routing and the micro-batch LBL scope, and returns rank 0's
records as the trainer logs them (metrics.jsonl / routing.jsonl) - so the numbers compared are
the ones a user sees. Several layouts of one world size run one after the other in a single
launch (a launch of the tiny model costs a few seconds of process and group start-up on 2
cores).
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import pytest
import torch

# Imported in the parent so the forked ranks inherit them (tests/harness/launcher.py).
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401
from moetrain.config.schema import MoetrainConfig
from moetrain.data import ensure_prepared
from moetrain.parallel import parallelize  # noqa: F401 - imported in the parent for the ranks
from tests.harness import run_distributed, tiny_config, trainer_for

STEPS = 3
# Over the harness's tiny run (tests/harness: a global batch of 4 micro-batches of 2): K steps,
# dropless, the micro-batch LBL scope.
EQUIVALENCE = (f"train.max_steps={STEPS}", "model.moe.capacity_factor=null",
               "model.moe.lbl.scope=micro")
KEYS = ("loss", "grad_norm", "aux_loss", "z_loss", "load_cv")
# Compared too where the runs log them: the MTP losses per depth (model.mtp.depth > 0), the
# validation losses (train.eval_every) and the step's largest attention logit
# (optim.qk_clip_threshold).
OPTIONAL = re.compile(r"^(val_loss(/.+)?|val_mtp_loss/\d+|mtp_loss/\d+|max_attn_logit)$")
EXCHANGE_KEYS = ("ep_budget", "ep_need", "ep_overflows", "ep_wasted_rows")  # with ep_budget
RTOL = 1e-5


def layout_config(world_size: int, overrides: list[str]) -> MoetrainConfig:
    """The typed, validated config of a layout: the tiny experiment, EQUIVALENCE, `overrides`
    (an `+experiment=NAME` among them replaces the tiny experiment)."""
    return tiny_config([*EQUIVALENCE, *overrides], world_size)


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of this rank's parameters and gradients (local shards, by name, bytes): equal
    digests of two runs of one layout mean bitwise equal weights and last-step gradients."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        for t in (p, p.grad):
            if t is not None:
                t = t.to_local() if hasattr(t, "to_local") else t
                h.update(name.encode())
                h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()



# State the logged records do not show, compared after the last step on every rank: the
# aux-loss-free expert biases (moved by the global loads) and the shared-expert gates (reduced
# with the router). A bug in either barely moves the loss within K steps (issue 29).
PROBES = ("router.expert_bias", "shared_expert_gate.weight")
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _probes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's PROBES tensors by parameter name, whole (a DTensor gathered: every rank of
    its mesh calls this in the same order)."""
    out = {}
    for name, t in [*model.named_buffers(), *model.named_parameters()]:
        if name.endswith(PROBES):
            for w in _WRAPPERS:
                name = name.replace(w, "")
            t = t.detach()
            out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone().cpu()
    return out


def _train(rank: int, world_size: int, jobs: list[tuple[str, MoetrainConfig, Path]],
           faults: Optional[dict[str, Callable[[], ContextManager]]] = None):
    """In every rank: train each job (inside its fault's context, if any); returns (rank 0's
    records by job, this rank's (dp_rank, first step's micro-batches) by job, this rank's
    `digest` after the last step by job, this rank's probes after training by job)."""
    torch.set_num_threads(1)  # the launcher did already; also for a direct call
    records: dict[str, list[dict[str, Any]]] = {}
    samples: dict[str, tuple[int, list[list[int]]]] = {}
    digests: dict[str, str] = {}
    probes: dict[str, dict[str, torch.Tensor]] = {}
    for name, cfg, run_dir in jobs:
        with (faults or {}).get(name, nullcontext)():
            trainer = trainer_for(cfg, run_dir)
            state = trainer.sampler.state_dict()
            samples[name] = (trainer.rank.dp_rank, trainer.sampler.next_step())
            trainer.sampler.load_state_dict(state)
            trainer.fit()
            digests[name] = digest(trainer.model)
            probes[name] = _probes(trainer.model)
            del trainer  # before the next job builds its model (real shapes: two would not fit)
        if rank == 0:
            records[name] = _records(run_dir)
    return records, samples, digests, probes


def _records(run_dir: Path) -> list[dict[str, Any]]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    routing = [json.loads(line) for line in (run_dir / "routing.jsonl").read_text().splitlines()]
    records = []
    for m, r in zip(metrics, routing):
        rec = {key: v for key, v in m.items()
               if key in ("step", *KEYS, *EXCHANGE_KEYS) or OPTIONAL.match(key)}
        rec["tokens_per_expert"] = [layer["tokens_per_expert"] for layer in r["layers"]]
        records.append(rec)
    return records


@dataclass
class LayoutRuns:
    records: dict[str, list[dict[str, Any]]]  # layout -> rank 0's record of every step
    # layout -> per rank: (dp_rank, the micro-batches (sample indices) of its first step)
    samples: dict[str, list[tuple[int, list[list[int]]]]]
    run_dirs: dict[str, Path]  # layout -> its run directory
    digests: dict[str, list[str]]  # layout -> per rank, `digest` of its model after the last step
    # layout -> per rank: the PROBES it holds after the last step, by parameter name
    probes: dict[str, list[dict[str, torch.Tensor]]]


def run_layouts(
    world_size: int, layouts: dict[str, list[str]], tmp_dir: Path, timeout: float = 300,
    faults: Optional[dict[str, Callable[[], ContextManager]]] = None,
) -> LayoutRuns:
    """Train every layout (name -> overrides) on `world_size` forked ranks, one after another in
    one launch. `faults`: layout name -> a context manager factory every rank enters around that
    layout's run (a bug put back on purpose, to show that a comparison fails)."""
    jobs = []
    for name, overrides in layouts.items():
        cfg = layout_config(world_size, overrides)
        run_dir = Path(tmp_dir) / f"w{world_size}-{name}"
        run_dir.mkdir(parents=True)
        jobs.append((name, cfg, run_dir))
    # Tokenizer and shards once, in the parent, before any rank looks for them.
    for data in {repr(cfg.data): cfg.data for _, cfg, _ in jobs}.values():
        ensure_prepared(data, jobs[0][1].model.vocab_size)
    results = run_distributed(_train, world_size, jobs, faults, timeout=timeout, pg_timeout=60)
    samples = {name: [r[1][name] for r in results] for name in layouts}
    digests = {name: [r[2][name] for r in results] for name in layouts}
    probes = {name: [r[3][name] for r in results] for name in layouts}
    return LayoutRuns(records=results[0][0], samples=samples,
                      run_dirs={name: run_dir for name, _, run_dir in jobs}, digests=digests,
                      probes=probes)


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, float]:
    """Assert `records` equal the single-process `reference`: loss, grad norm, aux and z losses,
    load CV, the MTP losses and (where the layout evaluated) the validation losses (`val_loss`,
    `val_loss/<source>` of each source, `val_mtp_loss/<k>`) to rel. RTOL, expert token counts
    exactly. Returns the largest rel. error per key."""
    assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    worst = {key: 0.0 for key in KEYS}
    bad = []
    for got, want in zip(records, reference):
        optional = tuple(sorted(k for k in got if OPTIONAL.match(k)))
        missing = [k for k in optional if k not in want]
        assert not missing, f"step {got['step']}: the reference did not log {missing}"
        evaluated = {k for k in optional if k.startswith("val_")}
        if evaluated:
            assert evaluated == {k for k in want if k.startswith("val_")}, \
                f"step {got['step']}: the reference did not evaluate the same sources and depths"
        lost = [k for k in want if k.startswith("mtp_loss/") and k not in got]
        assert not lost, f"step {got['step']}: the layout did not log {lost}"
        for key in KEYS + optional:
            err = rel_err(got[key], want[key]) if math.isfinite(got[key]) else math.inf
            if not err < RTOL:
                bad.append(f"step {got['step']} {key}: {got[key]!r} vs {want[key]!r} (rel {err:.2e})")
            worst[key] = max(worst.get(key, 0.0), err)
        if got["tokens_per_expert"] != want["tokens_per_expert"]:
            bad.append(f"step {got['step']} tokens_per_expert differ")
    assert not bad, "not equal to the single-process run:\n" + "\n".join(bad)
    return worst


# -- references shared by the layout tests (one single-process launch per session) ------------

# The layout tests use a global batch of 4 (2 micro-batches of 2): half the micro-batches of
# TINY, the per-micro-batch overhead of 4-8 processes on 2 cores is what their time goes to.
# Each layout names the single-process run it must equal: the same micro-batches per step
# (micro_batch_size; with DP more sequences per step), layers and LBL scope.
B4 = ["train.global_batch_size=4"]
# The "b4" run (so every layout compared with it) also evaluates on one global batch of the
# validation split after the last step.
EVAL = ("train.eval_every=3", "train.eval_batches=1")
# Aux-loss-free balancing: the expert biases move after every step from the global load.
BIAS = ("model.moe.routing.bias_rate=0.01",)
# A second model: shared experts (reduced like the router), tied embeddings (one DTensor for the
# vocab-parallel embedding and output head) and the global LBL scope (counts summed over
# dp x cp x tp; without DP its running counts see the micro-batches in the single process's
# order, so it is exactly comparable under TP).
VARIANT = ("model.moe.lbl.scope=global", "model.moe.num_shared_experts=1",
           "model.tie_embeddings=true")
# Progressive sparsification: top_k from all 8 experts (dense) down to 2 over the 3 steps.
TOP_K_SCHEDULE = ("model.moe.schedule.top_k.kind=linear", "model.moe.schedule.top_k.start=8",
                  "model.moe.schedule.top_k.end=2", "model.moe.schedule.top_k.end_step=2")
# Multi-head latent attention (DeepSeek-V2/V3) with low-rank queries and YaRN: its own
# softmax scale and value width through CP, its replicated latent path through TP.
MLA = ("model.attention=mla", "model.n_kv_heads=8", "model.mla.q_lora_rank=32",
       "model.mla.kv_lora_rank=32", "model.mla.qk_nope_head_dim=16",
       "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=12", "model.rope_scaling.kind=yarn",
       "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=32",
       "model.rope_scaling.mscale=1.0", "model.rope_scaling.mscale_all_dim=1.0")
# Muon with Newton-Schulz in fp32 (in bf16 its rounding turns the last-bit differences every
# layout's gradients have into ~1% of an update: docs/optimizers.md) and QK-clip at a threshold
# the tiny model's largest logits cross (1.9 at the first step, then 0.36-0.43 once clipped;
# MLA's 0.84, then 0.18-0.19).
MUON = ("optim=muon", "optim.ns_dtype=fp32", "optim.qk_clip_threshold=0.3")
MUON_MLA = (*MUON[:2], "optim.qk_clip_threshold=0.15")
# Qwen2-MoE's sigmoid gate on a shared expert.
GATE = ("model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true")
REFERENCES: dict[str, list[str]] = {
    "b4": [*B4, *EVAL],
    "b4-variant": [*B4, *VARIANT],
    "b4-top-k-schedule": [*B4, *TOP_K_SCHEDULE],
    "b4-mb1": [*B4, "train.micro_batch_size=1"],
    "b4-mb1-bias": [*B4, "train.micro_batch_size=1", *BIAS],
    "b4-mb1-l8": [*B4, "train.micro_batch_size=1", "model.n_layers=8"],
    "b4-l2": [*B4, "model.n_layers=2"],  # one dense and one MoE block
    "b8-mb1": ["train.micro_batch_size=1"],
    "b4-global": [*B4, "model.moe.lbl.scope=global"],
    "b4-mb4-global": [*B4, "train.micro_batch_size=4", "model.moe.lbl.scope=global"],
    "b4-mla": [*B4, *MLA],
    "b4-muon": [*B4, *MUON],
    "b4-mb1-muon": [*B4, "train.micro_batch_size=1", *MUON],
    "b8-mb1-muon": ["train.micro_batch_size=1", *MUON],
    "b4-mla-muon": [*B4, *MLA, *MUON_MLA],
    # a shared expert: what the overlapped exchange computes while the rows travel
    "b4-shared": [*B4, "model.moe.num_shared_experts=1"],
    # the shared-expert gate (reduced with the router) and the expert bias (global loads)
    "b4-gate-bias": [*B4, *GATE, *BIAS],
    "b4-seq": [*B4, "model.moe.lbl.scope=seq"],
}


@dataclass(frozen=True)
class Layout:
    """A layout to train: its overrides and the name of the reference (in REFERENCES) it equals."""

    overrides: tuple[str, ...]
    reference: str = "b4"


def run_cases(world_size: int, cases: dict[str, Layout], tmp_dir: Path,
              references: dict[str, list[str]] = REFERENCES,
              faults: Optional[dict[str, Callable[[], ContextManager]]] = None) -> LayoutRuns:
    """`run_layouts` for `Layout`s: the reference's overrides (from `references`), then the
    layout's."""
    layouts = {name: [*references[c.reference], *c.overrides] for name, c in cases.items()}
    return run_layouts(world_size, layouts, tmp_dir, timeout=600, faults=faults)


def assert_bitwise_equal(runs: LayoutRuns, name: str, other: str) -> None:
    """Layouts `name` and `other` (one world size, one launch) logged the same numbers and end
    with the same weights and gradients on every rank, bit for bit."""
    strip = lambda recs: [{k: v for k, v in r.items() if k not in EXCHANGE_KEYS}  # noqa: E731
                          for r in recs]
    assert strip(runs.records[name]) == strip(runs.records[other]), \
        f"{name} and {other} logged different numbers"
    assert runs.digests[name] == runs.digests[other], \
        f"{name} and {other} end with different weights or gradients (per rank: " + ", ".join(
            str(a == b) for a, b in zip(runs.digests[name], runs.digests[other])) + ")"


def layouts_fixture(world_size: int, cases: dict[str, Layout],
                    references: dict[str, list[str]] = REFERENCES):
    """A module-scoped pytest fixture whose value is `run_cases(world_size, cases, ...)`: the
    module's layouts of one world size in one launch (`two_ranks = layouts_fixture(2, TWO_RANKS)`
    in the module)."""

    @pytest.fixture(scope="module")
    def launch(tmp_path_factory):
        return run_cases(world_size, cases, tmp_path_factory.mktemp(f"w{world_size}"), references)

    return launch


def compare_probes(per_rank: list[dict[str, torch.Tensor]],
                   reference: dict[str, torch.Tensor]) -> float:
    """Assert every rank's PROBES equal the single process's after the last step: expert biases
    exactly (integer loads, +-rate steps), gates to rel. 1e-4 (three AdamW steps amplify fp32
    summation-order differences; a gate reduced over too few ranks is off by far more). Every
    reference probe must be held by some rank. Returns the gates' largest rel. error."""
    worst, bad, seen = 0.0, [], set()
    for rank, probes in enumerate(per_rank):
        for name, got in probes.items():
            want = reference[name]
            seen.add(name)
            if name.endswith("expert_bias"):
                if not torch.equal(got, want):
                    bad.append(f"rank {rank} {name}: {got.tolist()} vs {want.tolist()}")
                continue
            err = float((got - want).norm() / want.norm().clamp_min(1e-12))
            worst = max(worst, err)
            if not err < 1e-4:
                bad.append(f"rank {rank} {name}: rel. error {err:.2e}")
    missing = sorted(set(reference) - seen)
    assert not missing, f"no rank holds {missing}"
    assert not bad, "not equal to the single-process run after the last step:\n" + "\n".join(bad)
    return worst


def check_case(runs: LayoutRuns, name: str, case: Layout,
               references: LayoutRuns) -> dict[str, float]:
    """Assert layout `name` equals its reference (`compare`, and the probes: `compare_probes`);
    print and return the errors."""
    worst = compare(runs.records[name], references.records[case.reference])
    worst["probes"] = compare_probes(runs.probes[name], references.probes[case.reference][0])
    print(f"{name} vs {case.reference}: max rel. error "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return worst
