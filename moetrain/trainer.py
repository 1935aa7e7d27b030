"""The training loop: micro-batches, losses, optimizer step, metrics, checkpoints.

Read top to bottom: `Trainer.__init__` builds data, model, optimizer and resumes; `fit` runs
optimizer steps; `train_step` is one step over this rank's micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from moetrain.checkpoint import CheckpointManager, TrainState
from moetrain.checkpoint.convert import load_model_state
from moetrain.config import ConfigError
from moetrain.config.schema import MoetrainConfig
from moetrain.data import GlobalBatchSampler, PackedTokenDataset, ensure_prepared, val_steps
from moetrain.metrics import MetricsLogger, RoutingAccumulator
from moetrain.model import (
    Transformer, reset_lbl_accumulators, set_aux_loss_scale, set_capacity_factor,
    set_recompute, set_top_k, update_expert_bias,
)
from moetrain.model.moe.schedule import capacity_factor_at, top_k_at
from moetrain.model.upcycle import UpcycleError, upcycle_
from moetrain.optim import build_optimizer, lr_at, set_lr
from moetrain.parallel import ParallelDims, build_parallel_context
from moetrain.preemption import PreemptionWatcher, clear_preempted, mark_preempted
from moetrain.runtime import Runtime

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class Trainer:
    def __init__(self, cfg: MoetrainConfig, rt: Runtime, run_dir: Path) -> None:
        self.cfg, self.rt, self.run_dir = cfg, rt, run_dir
        self.start_time = time.monotonic()
        t = cfg.train
        dims = ParallelDims.from_config(cfg.parallel, rt.world_size)
        self.par = build_parallel_context(dims, rt.device.type)

        prepared = ensure_prepared(cfg.data, cfg.model.vocab_size)
        self.train_data = PackedTokenDataset(prepared, "train", cfg.data.seq_len)
        self.val_data = (
            PackedTokenDataset(prepared, "val", cfg.data.seq_len) if t.eval_every > 0 else None
        )
        self.sampler = GlobalBatchSampler(
            num_samples=len(self.train_data), global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.par.dp_rank,
            dp_size=self.par.dp_size, seed=t.seed,
        )
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.micro_batches_per_step = t.global_batch_size // t.micro_batch_size

        # Every rank builds the full model from the same seed, so any layout starts from the
        # same weights; the parallel context then shards/replicates it.
        torch.manual_seed(t.seed)
        model = Transformer(cfg.model)
        set_recompute(model, t.recompute)
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
        if cfg.model.init.upcycle_from and self.ckpt.resolve(cfg.checkpoint.resume) is None:
            self._upcycle(model)
        self.model = self.par.parallelize(model.to(rt.device), cfg)
        self.optimizer = build_optimizer(self.model, cfg.optim)

        self.state = TrainState()
        self._resume()
        self.metrics = None
        if rt.is_main:
            self.metrics = MetricsLogger(
                run_dir, cfg.logging, t.max_steps,
                resume_step=self.state.step if self.resumed_from else None,
                config_dict=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            )

    def _upcycle(self, model: torch.nn.Module) -> None:
        """Start from a dense checkpoint (model.init.upcycle_from); not when resuming."""
        init = self.cfg.model.init
        source = CheckpointManager(init.upcycle_from, None).resolve(init.upcycle_from)
        try:
            upcycle_(model, load_model_state(source), init.upcycle_granularity)
        except UpcycleError as err:
            raise ConfigError(f"model.init.upcycle_from={init.upcycle_from!r}: {err}") from None
        if self.rt.is_main:
            log.info("upcycled the MoE model from the dense checkpoint %s", source)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        self.resumed_from = self.ckpt.resolve(self.cfg.checkpoint.resume)
        if self.resumed_from is None:
            return
        self.state = self.ckpt.load(self.resumed_from, self.model, self.optimizer)
        if self.state.sampler is not None:
            self.sampler.load_state_dict(self.state.sampler)
        log.info("resumed from %s at step %d", self.resumed_from, self.state.step)

    def save_checkpoint(self, background: bool = False) -> Path:
        self.state.sampler = self.sampler.state_dict()
        meta = {"parallel": OmegaConf.to_container(OmegaConf.structured(self.cfg.parallel)),
                "world_size": self.rt.world_size}
        path = self.ckpt.save(self.model, self.optimizer, self.state, meta, async_save=background)
        if self.rt.is_main:
            log.info("%s checkpoint %s", "saving" if background else "saved", path)
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        t, c = self.cfg.train, self.cfg.checkpoint
        bad_in_row = 0
        self.preemption = PreemptionWatcher()
        if self.rt.is_main:
            clear_preempted(self.run_dir)
        try:
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = lr_at(step, self.cfg.optim, t.max_steps)
                set_lr(self.optimizer, lr)
                top_k = self._apply_sparsity_schedule(step)
                start = time.monotonic()
                record, routing = self.train_step(self.sampler.next_step())
                elapsed = time.monotonic() - start

                self.state.step += 1
                self.state.consumed_tokens += self.tokens_per_step
                if record["skipped"]:
                    bad_in_row += 1
                    self.state.bad_steps_total += 1
                    if bad_in_row >= t.max_bad_steps:
                        raise TrainingError(
                            f"loss or gradient was NaN/inf for {bad_in_row} steps in a row "
                            f"(train.max_bad_steps={t.max_bad_steps}); stopping at step {self.state.step}"
                        )
                else:
                    bad_in_row = 0

                record = {"step": self.state.step, **record}
                record.update(
                    lr=lr, tokens=self.state.consumed_tokens,
                    tokens_per_s=self.tokens_per_step / max(elapsed, 1e-9),
                    top_k=top_k, bad_steps_total=self.state.bad_steps_total,
                    step_time_s=elapsed,
                )
                if t.eval_every and self.state.step % t.eval_every == 0:
                    record["val_loss"] = self.evaluate()
                if self.metrics is not None and (
                    self.state.step % t.log_every == 0 or self.state.step == t.max_steps
                ):
                    self.metrics.log(record, {"step": self.state.step, **routing})

                stop_reason = self._stop_reason()
                due = c.every > 0 and (self.state.step % c.every == 0 or self.state.step == t.max_steps)
                # Stopping early: save whatever checkpoint.every says, so a requeued job resumes here.
                self.ckpt.poll()
                if due or stop_reason:
                    # The last checkpoint of a run is written in the foreground: the job ends next.
                    last = stop_reason is not None or self.state.step == t.max_steps
                    self.save_checkpoint(background=c.async_save and not last)
                if stop_reason:
                    if self.rt.is_main:
                        mark_preempted(self.run_dir, self.state.step, stop_reason)
                    log.info("stopping at step %d: %s; checkpoint saved", self.state.step, stop_reason)
                    break
        finally:
            self.ckpt.wait()
            self.preemption.close()
            if self.metrics is not None:
                self.metrics.close()

    def _apply_sparsity_schedule(self, step: int) -> int:
        """Set this step's top_k and capacity factor on every MoE layer (pure functions of the step)."""
        moe = self.cfg.model.moe
        top_k = top_k_at(moe, step)
        set_top_k(self.model, top_k)
        set_capacity_factor(self.model, capacity_factor_at(moe, step))
        return top_k

    def _stop_reason(self) -> str | None:
        """Why to stop before max_steps (a signal, or train.max_time), agreed by every rank."""
        t = self.cfg.train
        out_of_time = t.max_time is not None and time.monotonic() - self.start_time > t.max_time
        if not self.par.any_rank(self.preemption.requested or out_of_time):
            return None
        if self.preemption.requested:
            return f"received {self.preemption.signal_name}"
        return f"train.max_time={t.max_time}s reached" if out_of_time else "another rank was signalled"

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[list[int]]) -> tuple[dict[str, Any], dict[str, Any]]:
        model, rt = self.model, self.rt
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Scales are chosen so that summing gradients over all micro-batches of all ranks gives
        # the gradient of (mean LM loss over the global batch + mean aux loss per micro-batch).
        set_aux_loss_scale(model, 1.0 / self.micro_batches_per_step)
        reset_lbl_accumulators(model)
        batches = [self.train_data.get_batch(indices).to(rt.device, non_blocking=True)
                   for indices in micro_batches]
        # A loop over the micro-batches, or a pipeline schedule; each micro-batch's summed LM
        # loss is backpropagated divided by the global batch's token count.
        lm_sum, moe_stats = self.par.forward_backward(model, batches, self.tokens_per_step,
                                                      rt.autocast)
        routing = RoutingAccumulator()
        for stats in moe_stats:
            routing.add(stats)

        lm_loss = float(self.par.all_reduce_tokens(lm_sum)) / self.tokens_per_step
        moe = self.cfg.model.moe
        scalars, routing_record = routing.summarize(
            self.par.all_reduce_routing, self.micro_batches_per_step, moe.lbl.coeff, moe.z_loss_coeff,
            moe.lbl.scope,
        )
        grad_norm = self.par.clip_grad_norm(model, self.cfg.optim.grad_clip)
        skipped = not (math.isfinite(lm_loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            if moe.routing.bias_rate > 0:  # aux-loss-free balancing from this step's global load
                update_expert_bias(model, [torch.tensor(layer["tokens_per_expert"])
                                           for layer in routing_record["layers"]])
        record = {
            "loss": lm_loss,
            "lm_loss": lm_loss,
            **scalars,
            "total_loss": lm_loss + scalars["aux_loss"] + scalars["z_loss"],
            "grad_norm": grad_norm,
            "skipped": skipped,
        }
        return record, routing_record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the first `train.eval_batches` global batches of the validation split."""
        assert self.val_data is not None
        model, t = self.model, self.cfg.train
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        count = torch.zeros((), dtype=torch.float64, device=self.rt.device)
        steps = val_steps(len(self.val_data), t.eval_batches, t.global_batch_size,
                          t.micro_batch_size, self.par.dp_rank, self.par.dp_size)
        for micro_batches in steps:
            batches = [self.val_data.get_batch(indices).to(self.rt.device)
                       for indices in micro_batches]
            loss_sum, targets = self.par.eval_sums(model, batches, self.rt.autocast)
            total += loss_sum.to(total.device)
            count += targets.to(count.device)
        model.train()
        return float(self.par.all_reduce_tokens(total) / self.par.all_reduce_tokens(count))
