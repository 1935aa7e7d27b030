"""The single-process `Trainer` and the independent `Reference` (reference.py) in lockstep.

    result = run_lockstep(tmp_path, ["model.moe.lbl.scope=global"])
    result.assert_equal()      # every step: logged values, gradients, weights, AdamW state, bias

The trainer runs as a user runs it (`Trainer.fit` on a composed config, fp32, deterministic, one
thread); each optimizer step's micro-batches go to the reference too, before the trainer takes
the step. Compared, per step, with the reference's values (only outputs, no trainer internals):

- the logged records (metrics.jsonl, routing.jsonl): loss, aux_loss, z_loss, grad_norm,
  dropped_frac, experts_per_token, the MTP losses per depth and weighted (rel. RTOL), per-layer
  tokens_per_expert (exactly), lr and top_k (metrics.jsonl);
- the gradients AdamW receives (an optimizer step pre-hook: after accumulation and clipping),
  the weights after the step and AdamW's exp_avg / exp_avg_sq (per tensor, relative L2 error
  ||a - b|| / ||b|| < RTOL) and its step count;
- the expert biases after the step (exactly: sums of +-bias_rate from integer loads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moetrain.trainer import Trainer
from tests import harness
from tests.oracle.reference import Reference, StepOutput

STEPS = 3
RTOL = 1e-5
UPDATE_RTOL = 1e-3
# Muon's update of the same gradient: the same bf16 Newton-Schulz on the same bits, but the
# momentum's fp32 rounding may differ in the last bit (which bf16 can turn into one ulp).
MUON_UPDATE_RTOL = 1e-4
# Over the harness's tiny run (tests/harness): a tinier model, 3 layers (one dense, two MoE), 4
# experts of width 16, sequences of 16 tokens, a global batch of 4 sequences; one warmup step,
# then cosine decay (both parts of the LR rule).
ORACLE = [
    f"train.max_steps={STEPS}",
    "train.global_batch_size=4",
    "data.seq_len=16",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.n_layers=3",
    "model.ffn_hidden=48",
    "model.moe.num_experts=4",
    "model.moe.expert_hidden=16",
    "model.moe.lbl.coeff=0.1",
    "model.moe.z_loss_coeff=0.01",
    "optim.warmup_steps=1",
]
SCALARS = ("loss", "aux_loss", "z_loss", "grad_norm", "dropped_frac", "experts_per_token")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    diff = float((a.double() - b.double()).norm())
    scale = float(b.double().norm())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else (0.0 if a == 0 else math.inf)


@dataclass
class LockstepResult:
    overrides: list[str]
    errors: dict[str, float] = field(default_factory=dict)  # quantity -> worst error, all steps
    failures: list[str] = field(default_factory=list)
    outputs: list[StepOutput] = field(default_factory=list)  # the reference's, per step
    reference: Optional[Reference] = None  # after the last step
    records: list[dict[str, Any]] = field(default_factory=list)  # the trainer's metrics.jsonl

    def check(self, step: int, what: str, err: float, tol: float = RTOL) -> None:
        key = what.split(" ")[0]
        self.errors[key] = max(self.errors.get(key, 0.0), err)
        if not err < tol:
            self.failures.append(f"step {step} {what}: rel. error {err:.3g}")

    def exact(self, step: int, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.failures.append(f"step {step} {what}: {got} != reference {want}")

    def assert_equal(self) -> None:
        head = self.failures[:12] + ([f"... {len(self.failures) - 12} more"]
                                     if len(self.failures) > 12 else [])
        assert not self.failures, (f"trainer != reference for {self.overrides}:\n  "
                                   + "\n  ".join(head))

    def first_failing_step(self) -> Optional[int]:
        return min((int(f.split()[1]) for f in self.failures), default=None)

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


def build_trainer(run_dir: Path, overrides: list[str]) -> Trainer:
    return harness.build_trainer(run_dir, [*ORACLE, *overrides, f"run.dir={run_dir}"])


class _Stop(Exception):
    """Ends the first trainer of a resumed run after its checkpoint (like a killed job)."""


def run_lockstep(run_dir: Path, overrides: list[str],
                 reference: Optional[Callable[[Any, dict], Reference]] = None,
                 resume_after: Optional[int] = None) -> LockstepResult:
    """Train STEPS steps with the trainer and the reference side by side; collect every
    difference. `reference(cfg, state_dict)` builds another reference (default `Reference`).

    `resume_after=n`: the trainer saves a checkpoint at step n and stops; a new trainer resumes
    from it (checkpoint.resume=auto) and takes the remaining steps, while the reference goes on
    from its own state - so whatever the checkpoint misses (weights, AdamW moments, expert
    biases, step counter, sampler position) makes a difference. Its micro-batches must be the
    ones the first trainer was about to take."""
    ckpt = [] if resume_after is None else [f"checkpoint.every={resume_after}"]
    trainer = build_trainer(run_dir, [*overrides, *ckpt])
    ref = (reference or Reference)(trainer.cfg, {n: t.detach().clone()
                                                for n, t in trainer.model.state_dict().items()},
                                   eos_id=trainer.train_data.eos_id)
    result = LockstepResult(list(overrides), reference=ref)
    planned: dict[int, list[list[int]]] = {}
    _attach(trainer, ref, result, planned, stop_at=resume_after)
    try:
        trainer.fit()
    except _Stop:
        trainer = build_trainer(run_dir, [*overrides, *ckpt, "checkpoint.resume=auto"])
        result.exact(resume_after + 1, "resumed at step", trainer.state.step, resume_after)
        _attach(trainer, ref, result, planned, stop_at=None)
        trainer.fit()
    result.records = [json.loads(line)
                      for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    routing = [json.loads(line) for line in (run_dir / "routing.jsonl").read_text().splitlines()]
    # What a user sees: metrics.jsonl and routing.jsonl against the reference's values.
    for record, layers, want in zip(result.records, routing, result.outputs):
        step = record["step"]
        for key in SCALARS:
            result.check(step, key, rel(record[key], getattr(want, key)))
        mtp = {f"mtp_loss/{k}": v for k, v in enumerate(want.mtp_losses, start=1)}
        result.exact(step, "MTP losses logged", sorted(k for k in record if "mtp_loss/" in k),
                     sorted(mtp))
        for key, value in mtp.items():
            result.check(step, key, rel(record.get(key, math.nan), value))
        if mtp:  # what the MTP term adds to the total loss
            result.check(step, "mtp_loss", rel(record["mtp_loss"],
                                               want.mtp_scale / len(mtp) * sum(mtp.values())))
        result.exact(step, "tokens_per_expert",
                     [layer["tokens_per_expert"] for layer in layers["layers"]],
                     want.tokens_per_expert)
        result.check(step, "lr", rel(record["lr"], want.lr))
        if "max_attn_logit" in record:
            result.check(step, "max_attn_logit", rel(record["max_attn_logit"], want.max_attn_logit))
        result.exact(step, "top_k", record["top_k"], want.top_k)
    result.exact(0, "steps logged", [r["step"] for r in result.records], list(range(1, STEPS + 1)))
    return result


def _attach(trainer: Trainer, ref: Reference, result: LockstepResult,
            planned: dict[int, list[list[int]]], stop_at: Optional[int]) -> None:
    """Make `trainer.fit` take every step in lockstep with `ref` and record the differences."""
    model = trainer.model
    params = dict(model.named_parameters())
    fed: dict[str, torch.Tensor] = {}

    def capture_grads(optimizer, args, kwargs):  # what AdamW is about to use
        fed.clear()
        fed.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(capture_grads)
    step_fn = trainer.train_step

    def lockstep(micro_batches):
        step = ref.step + 1
        if step in planned:
            result.exact(step, "micro-batches after the resume", micro_batches, planned[step])
        planned[step] = micro_batches
        if stop_at is not None and step > stop_at:
            raise _Stop
        before = {n: p.detach().clone() for n, p in params.items()}
        want = ref.gradients([trainer.train_data.get_batch(ix) for ix in micro_batches])
        fed.clear()
        out = step_fn(micro_batches)
        # Muon's update is compared for the trainer's own gradient (Reference.update says why)
        ref.update(want, grads=dict(fed) if ref.muon_views else None)
        result.outputs.append(want)
        result.exact(step, "gradients of", sorted(fed), sorted(want.grads))
        for name, g in want.grads.items():
            if name in fed:
                result.check(step, f"grad {name}", rel_l2(fed[name], g))
        state = trainer.optimizer.state
        ref_state = ref.optimizer.state
        for name, p in params.items():
            q = ref.params[name]
            result.check(step, f"update {name}", rel_l2(p.detach() - before[name],
                                                         q.detach() - before[name]),
                         MUON_UPDATE_RTOL if name in ref.muon_views else UPDATE_RTOL)
            if name in ref.muon_views:  # torch.optim.Muon's buffers, one per matrix
                views = ref.muon_views[name]
                ref_buf = torch.stack([ref.muon.state[v]["momentum_buffer"] for v in views])
                result.check(step, f"momentum_buffer {name}",
                             rel_l2(state[p]["momentum_buffer"], ref_buf.view_as(p)))
            else:
                for key in ("exp_avg", "exp_avg_sq"):
                    result.check(step, f"{key} {name}", rel_l2(state[p][key], ref_state[q][key]))
                result.exact(step, f"adam step {name}", float(state[p]["step"]),
                             float(ref_state[q]["step"]))
            # The next step starts both from the trainer's weights and moments.
            with torch.no_grad():
                q.copy_(p)
                if name in ref.muon_views:
                    buf = state[p]["momentum_buffer"]
                    for e, v in enumerate(ref.muon_views[name]):
                        ref.muon.state[v]["momentum_buffer"].copy_(buf[e] if buf.ndim == 3
                                                                   else buf)
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    ref_state[q][key].copy_(state[p][key])
        for prefix, bias in ref.bias.items():
            got = model.get_buffer(f"{prefix}moe.router.expert_bias")
            if not torch.equal(got, bias):
                result.failures.append(f"step {step} expert_bias of {prefix}: {got.tolist()} "
                                       f"!= reference {bias.tolist()}")
        return out

    trainer.train_step = lockstep


def first_step_grads(run_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The gradients AdamW receives in the trainer's first optimizer step."""
    trainer = build_trainer(run_dir, [*overrides, "train.max_steps=1"])
    params = dict(trainer.model.named_parameters())
    grads: dict[str, torch.Tensor] = {}
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: grads.update(
        {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}))
    trainer.fit()
    return grads
