"""The training loop: micro-batches, losses, optimizer step, metrics, checkpoints.

Read top to bottom: `Trainer.__init__` builds data, model, optimizer and resumes; `fit` runs
optimizer steps; `train_step` is one step over this rank's micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from moetrain import memory
from moetrain.checkpoint import CheckpointError, CheckpointManager, TrainState
from moetrain.checkpoint.convert import ModelTensors
from moetrain.checkpoint.identity import check_resume, checkpoint_identity
from moetrain.config import ConfigError
from moetrain.config.schema import MoetrainConfig
from moetrain.data import DataExhausted, MixtureSampler, ensure_prepared, mixture_datasets
from moetrain.data.index import tokenizer_source
from moetrain.evaluation import Evaluator
from moetrain.fp8 import resolve_fp8
from moetrain.metrics import MetricsLogger, summarize_routing
from moetrain.metrics.throughput import Throughput, device_peak
from moetrain.model import MoEControl, Transformer, num_moe_layers, set_recompute
from moetrain.model.init import init_parameters
from moetrain.model.inputs import InputSpec
from moetrain.model.mtp import mtp_loss_scale_at
from moetrain.model.upcycle import UpcycleError, upcycle_
from moetrain.optim import build_optimizer, lr_at, set_lr
from moetrain.optim.qk_clip import QKClip
from moetrain.parallel import ParallelDims
from moetrain.parallel.grad_norm import clip_coefficient, scale_grads_
from moetrain.parallel.loss import loss_means
from moetrain.parallel.parallelize import BatchShape, parallelize
from moetrain.parallel.rank import RankLayout
from moetrain.preemption import PreemptionWatcher, clear_preempted, mark_preempted
from moetrain.recovery import TrainingError, count_bad_step, rollback
from moetrain.runtime import Runtime
from moetrain.step_fields import check_step_fields, step_fields
from moetrain.watchdog import Watchdog

log = logging.getLogger(__name__)


__all__ = ["Trainer", "TrainingError"]


class Trainer:
    def __init__(self, cfg: MoetrainConfig, rt: Runtime, run_dir: Path) -> None:
        self.cfg, self.rt, self.run_dir = cfg, rt, run_dir
        self.start_time = time.monotonic()
        t = cfg.train
        dims = ParallelDims.from_config(cfg.parallel, rt.world_size)
        self.rank = RankLayout.create(dims, rt.device)
        self.fp8 = resolve_fp8(t, rt.device)  # None: train.fp8=none (moetrain/fp8)

        init = cfg.model.init
        if init.from_hf or init.upcycle_from:
            from moetrain.hf.load import use_hf_tokenizer

            use_hf_tokenizer(cfg)  # an imported model keeps its vocabulary
        self.prepared_dir = ensure_prepared(cfg.data, cfg.model.vocab_size)
        self.tokenizer_path = tokenizer_source(self.prepared_dir)
        self.train_data, self.val_data = mixture_datasets(
            self.prepared_dir, cfg.data, t.eval_batches if t.eval_every > 0 else 0)
        # This rank's evaluation micro-batches, fixed for the run: a split too small for one
        # batch is refused now, not at the first evaluation after steps whose work is lost.
        self.evaluator = Evaluator(self.val_data, cfg, self.rank.dp_rank, dims.dp,
                                   announce=rt.is_main)
        self.sampler = MixtureSampler(
            self.train_data.sizes, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.rank.dp_rank,
            dp_size=dims.dp, seed=t.seed, weights=self.train_data.weights,
            names=self.train_data.names, on_exhausted=cfg.data.on_exhausted,
        )
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.micro_batches_per_step = t.global_batch_size // t.micro_batch_size

        # Built on the meta device and parallelized there; each rank allocates and initialises
        # only its own shards, with values that do not depend on the layout (train.seed).
        memory.reset_peak(rt.device)
        with torch.device("meta"):
            model = Transformer(cfg.model)
        # How windows become inputs and targets: MTP, documents (the data's EOS id).
        inputs = InputSpec(mtp_depth=cfg.model.mtp.depth, eos_id=self.train_data.eos_id,
                           document_mask=cfg.data.document_mask,
                           mask_boundary=cfg.data.boundary_loss == "mask")
        batch = BatchShape(t.micro_batch_size, self.micro_batches_per_step // dims.dp,
                           cfg.data.seq_len, inputs)
        self.model, self.runner = parallelize(model, self.rank, cfg.parallel, batch,
                                              compile=t.compile, fp8=self.fp8)
        init_parameters(self.model, cfg.model, t.seed)
        set_recompute(self.model, t.recompute)
        # The MoE layers' per-step state: schedules, aux-loss scale, statistics, expert bias.
        self.moe = MoEControl(
            self.model, cfg.model.moe, num_moe_layers=num_moe_layers(cfg.model),
            micro_batches_per_step=self.micro_batches_per_step,
            eval_capacity_factor=t.eval_capacity_factor, device=rt.device)
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
        # verified against its checksums; `auto` passes over ones that fail (self.rejected)
        self.resumed_from, self.rejected = self.ckpt.choose(cfg.checkpoint.resume)
        fresh = self.resumed_from is None
        if init.upcycle_from and fresh:
            self._upcycle(self.model)
        if init.from_hf and fresh:
            # Into the parallelised model: each rank reads only the slices it holds.
            from moetrain.hf.load import load_hf_weights

            n = load_hf_weights(self.model, init.from_hf, cfg.model)
            if rt.is_main:
                log.info("initialised %d tensors from the Hugging Face checkpoint %s", n,
                         init.from_hf)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.qk_clip = None if cfg.optim.qk_clip_threshold is None else QKClip(
            self.model, cfg.optim.qk_clip_threshold, cfg.model.n_layers, cfg.model.n_heads,
            cfg.model.mtp.depth)
        # What the step's one reduction carries (the planner counts the same description).
        self.step_fields = step_fields(cfg, dims.world_size)

        self.state = TrainState()
        self._resume()
        self.init_peak_gib: float | None = self._log_init_memory()
        self.step_peak_bytes = 0  # this rank's peak of the last step's window (train_step)
        self.preemption: PreemptionWatcher | None = None  # signal handlers while fit() runs
        self._stop_requested = False
        # Created by `fit`: building a Trainer only reads, so a refused start writes nothing.
        self.metrics: MetricsLogger | None = None

    def _log_init_memory(self) -> float:
        """Log this rank's peak memory of the set-up (its log file) and the maximum over ranks
        (the run's log); returns that maximum in GiB. The first step's window starts here."""
        peak = memory.peak_bytes(self.rt.device)
        memory.rank_log.debug("peak memory after init %.3f GiB (parameters %.3f GiB)",
                              peak / memory.GIB, memory.parameter_bytes(self.model) / memory.GIB)
        top = self.rank.max_over_ranks([peak])[0] / memory.GIB
        memory.reset_peak(self.rt.device)
        if self.rt.is_main:
            log.info("initialised: peak memory %.2f GiB (max over ranks)", top)
        return top

    def _upcycle(self, model: torch.nn.Module) -> None:
        """Start from a dense checkpoint (model.init.upcycle_from); not when resuming. Every rank
        checks the dense state against the whole model (on the meta device), then fills its
        own shards."""
        init = self.cfg.model.init
        try:
            if (Path(init.upcycle_from) / "config.json").is_file():  # a dense Hugging Face model
                from moetrain.hf.load import dense_config, read_dense_state

                dense_cfg, family = dense_config(self.cfg.model, init.upcycle_from)
                source = Path(init.upcycle_from)
                state = read_dense_state(source, dense_cfg, family)
            else:  # each tensor read when a rank needs it
                source = CheckpointManager(init.upcycle_from, None).resolve(init.upcycle_from)
                state = ModelTensors(source)
            with torch.device("meta"):
                whole = Transformer(self.cfg.model)
            upcycle_(model, state, init.upcycle_granularity, whole=whole)
        except CheckpointError as err:
            raise ConfigError(f"model.init.upcycle_from={init.upcycle_from!r}: not a dense moetrain "
                              "checkpoint (a step_<N> folder, checkpoints/ folder or run directory) "
                              f"nor a Hugging Face folder: {str(err).split(': ', 1)[-1]}") from None
        except UpcycleError as err:
            raise ConfigError(f"model.init.upcycle_from={init.upcycle_from!r}: {err}") from None
        if self.rt.is_main:
            log.info("upcycled the MoE model from the dense checkpoint %s", source)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        for r in self.rejected if self.rt.is_main else []:
            log.warning("checkpoint.resume=auto: passing over %s: %s", r.path, r.reason)
        if self.resumed_from is None:
            return
        # Refused when the checkpoint is of another architecture or tokenizer, shapes or not.
        changes = check_resume(self.resumed_from, self.cfg, self.prepared_dir)
        self.state = self.ckpt.load(self.resumed_from, self.model, self.optimizer)
        if self.state.sampler is not None:
            self.sampler.load_state_dict(self.state.sampler)
        log.info("resumed from %s at step %d", self.resumed_from, self.state.step)
        if changes and self.rt.is_main:
            log.info("changed since that checkpoint: %s", "; ".join(changes))

    def save_checkpoint(self, background: bool = False) -> Path:
        self.state.sampler = self.sampler.state_dict()
        meta = {"parallel": OmegaConf.to_container(OmegaConf.structured(self.cfg.parallel)),
                "world_size": self.rt.world_size,
                # what `python -m moetrain.hf export` writes as the model's tokenizer
                "tokenizer": str(self.tokenizer_path),
                # the routing the weights were trained with at their last step (the export's)
                "routing": self._routing_record(),
                # what resuming checks: the config, its architecture, the tokenizer's identity
                "identity": checkpoint_identity(self.cfg, self.prepared_dir)}
        with self._phase("checkpoint"):
            path = self.ckpt.save(self.model, self.optimizer, self.state, meta,
                                  async_save=background)
        if self.rt.is_main:
            log.info("%s checkpoint %s", "saving" if background else "saved", path)
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        t, c = self.cfg.train, self.cfg.checkpoint
        rolled_back_to: Path | None = None
        self.preemption = PreemptionWatcher(announce=self.rt.is_main)
        throughput = self._throughput() if self.rt.is_main else None
        self.watchdog = Watchdog(self.cfg.fault, self.run_dir, self.rt.rank, self.rt.world_size)
        self.ckpt.remove_stale_partials()
        if self.rt.is_main:
            self.metrics = MetricsLogger(
                self.run_dir, self.cfg.logging, t.max_steps,
                resume_step=self.state.step if self.resumed_from else None,
                config_dict=OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True),
            )
            clear_preempted(self.run_dir)
            if self.rejected:
                self.metrics.event("resume_fallback", self.state.step, resumed_from=str(
                    self.resumed_from), rejected=[r.record() for r in self.rejected])
        try:
            while self.state.step < t.max_steps:
                step = self.state.step
                self.watchdog.step(step)
                lr = lr_at(step, self.cfg.optim, t.max_steps)
                set_lr(self.optimizer, lr)
                try:
                    micro_batches = self.sampler.next_step()
                except DataExhausted as err:  # data.on_exhausted=stop
                    if self.rt.is_main:
                        log.info("stopping at step %d: %s", step, err)
                    if c.every > 0 and step % c.every and self.state.bad_in_row == 0:
                        self.save_checkpoint()
                    break
                start = time.monotonic()
                record, moe_stats = self.train_step(micro_batches)
                elapsed = time.monotonic() - start
                moe = self.cfg.model.moe
                scalars, routing = summarize_routing(moe_stats, self.micro_batches_per_step,
                                                     moe.lbl.coeff, moe.z_loss_coeff, moe.lbl.scope)
                record.update(scalars, total_loss=record["lm_loss"] + scalars["aux_loss"]
                              + scalars["z_loss"] + record.get("mtp_loss", 0.0))

                self.state.step += 1
                self.state.consumed_tokens += self.tokens_per_step
                try:  # the record of a failing step is written before the run stops
                    roll_back, failing = count_bad_step(self.state, record["skipped"],
                                                        t.max_bad_steps, t.on_bad_steps), None
                except TrainingError as err:
                    roll_back, failing = False, err

                record = {"step": self.state.step, **record}
                record.update(
                    lr=lr, tokens=self.state.consumed_tokens,
                    tokens_per_s=self.tokens_per_step / max(elapsed, 1e-9),
                    bad_steps_total=self.state.bad_steps_total,
                    step_time_s=elapsed,
                )
                # The realised mixture: training tokens drawn from each source so far.
                record.update({f"source_tokens/{name}": n * self.cfg.data.seq_len
                               for name, n in self.sampler.consumed().items()})
                if throughput is not None:
                    record.update(throughput.record(record["tokens_per_s"], record["top_k"]))
                if t.eval_every and self.state.step % t.eval_every == 0 and failing is None:
                    record.update(self.evaluate())
                if (self.state.step % t.log_every == 0 or self.state.step == t.max_steps
                        or failing is not None):
                    memory.rank_log.debug("step %d: peak memory %.3f GiB", self.state.step,
                                          self.step_peak_bytes / memory.GIB)
                    if self.metrics is not None:
                        if self.init_peak_gib is not None:  # the first record of this process
                            record["memory_init_peak_gib"] = self.init_peak_gib
                            self.init_peak_gib = None
                        self.metrics.log(record, {"step": self.state.step, **routing})
                if failing is not None:
                    raise failing

                if roll_back:
                    rolled_back_to = self._roll_back(rolled_back_to)
                    continue
                stop_reason = self._stop_reason()
                finished = self.state.step == t.max_steps
                due = c.every > 0 and (self.state.step % c.every == 0 or finished)
                # Stopping early: save whatever checkpoint.every says, so a requeued job resumes here.
                self.ckpt.poll()
                # Never a checkpoint of weights that may be poisoned (moetrain/recovery.py).
                saved = (due or stop_reason) and not record["skipped"]
                if saved:
                    # The last checkpoint of a run is written in the foreground: the job ends next.
                    last = stop_reason is not None or finished
                    self.save_checkpoint(background=c.async_save and not last)
                elif due or stop_reason:
                    log.warning("no checkpoint at step %d: the step was not finite (%d in a row); "
                                "latest stays %s", self.state.step, self.state.bad_in_row,
                                self.ckpt.latest_name())
                if stop_reason:
                    if self.rt.is_main and not finished:  # a finished run is not requeued
                        mark_preempted(self.run_dir, self.state.step, stop_reason)
                    log.info("stopping at step %d: %s; %s", self.state.step, stop_reason,
                             "checkpoint saved" if saved else "no checkpoint (non-finite step)")
                    break
        finally:
            self.ckpt.wait()
            self.preemption.close()
            self.watchdog.close()
            if self.metrics is not None:
                self.metrics.close()

    def _phase(self, name: str):
        """A checkpoint or an evaluation, for the watchdog (the generous timeout applies)."""
        watchdog = getattr(self, "watchdog", None)
        return watchdog.phase(name) if watchdog is not None else nullcontext()

    def _roll_back(self, previous: Path | None) -> Path:
        """train.on_bad_steps=rollback (moetrain/recovery.py); returns the checkpoint used."""
        at = self.state.step
        with self._phase("checkpoint"):
            self.state, path = rollback(self.ckpt, self.model, self.optimizer, self.state, previous)
        if self.metrics is not None:
            self.metrics.event("rollback", at, resumed_from=str(path), to_step=self.state.step)
        return path

    def _routing_record(self) -> dict:
        """The routing the weights were last trained with (the step's schedules, set by
        `MoEControl`), recorded in each checkpoint for the export."""
        moe = self.cfg.model.moe
        step = max(self.state.step - 1, 0)
        routing = self.moe.routing or self.moe.routing_at(step)
        return {"step": step, "top_k": routing.top_k, "capacity_factor": routing.capacity_factor,
                "top_p": moe.routing.top_p}

    def _throughput(self) -> Throughput:
        """MFU bookkeeping of the run (rank 0): the peak of its device, named in each record."""
        peak = device_peak(self.rt.device, self.rt.autocast_dtype or torch.float32)
        log.info("MFU is measured against %.4g TFLOP/s per device: %s", peak.tflops, peak.name)
        return Throughput(self.cfg.model, self.cfg.data.seq_len, self.rt.world_size, peak)

    def _out_of_time(self) -> bool:
        t = self.cfg.train
        return t.max_time is not None and time.monotonic() - self.start_time > t.max_time

    def _wants_to_stop(self) -> bool:
        """This rank's stop flag for the step's reduction (a signal, or train.max_time)."""
        return (self.preemption is not None and self.preemption.requested) or self._out_of_time()

    def _stop_reason(self) -> str | None:
        """Why to stop before max_steps, agreed by every rank: the flags of the last step's
        reduction (a signal or train.max_time on any rank)."""
        if not self._stop_requested:
            return None
        if self.preemption is not None and self.preemption.requested:
            return f"received {self.preemption.signal_name}"
        t = self.cfg.train
        return f"train.max_time={t.max_time}s reached" if self._out_of_time() else "another rank was signalled"

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[list[int]]) -> tuple[dict[str, Any], Any]:
        """Optimizer step `self.state.step` over this rank's micro-batches. Returns the step's
        global loss, gradient norm, skip flag and top-k (and, with `model.moe.ep_budget`, the
        exchange's budget metrics), and the MoE statistics summed over every rank, on the host
        (None without MoE layers). Reads the device once (plus, with exact-size expert-parallel
        exchanges, their count exchanges inside the MoE layers); a step whose sync-free exchange
        overflowed its budget is redone, one more read each time."""
        model, rt, runner = self.model, self.rt, self.runner
        model.train()
        batches = [self.train_data.get_batch(indices).to(rt.device, non_blocking=True)
                   for indices in micro_batches]
        mtp_scale = mtp_loss_scale_at(self.cfg.model.mtp, self.state.step)
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            # The step's top-k and capacity (its schedules), and the aux losses' gradient:
            # summing gradients over all micro-batches of all ranks gives the gradient of (mean
            # LM loss over the global batch + mean aux loss per micro-batch).
            routing = self.moe.start_step(self.state.step)
            # A loop over the micro-batches, or a pipeline schedule; each micro-batch's summed
            # LM (and MTP) loss is backpropagated divided by the global batch's token count.
            token_sums = runner.forward_backward(model, batches, self.tokens_per_step,
                                                 rt.autocast, mtp_loss_scale=mtp_scale)
            stats = self.moe.step_stats()
            # Loss, gradient norm, stop flags, every rank's peak memory since the previous step's
            # reduction, the routing statistics and the exchange's counters: one reduction, one
            # host read.
            self.step_peak_bytes = memory.peak_bytes(rt.device)
            sums = {"stop": torch.tensor(float(self._wants_to_stop()))}
            if stats is not None:
                sums["moe"] = stats.rows_LC
            exchange_sums, exchange_per_rank = self.moe.exchange_sums()
            per_rank = {"memory_peak": self.step_peak_bytes, **exchange_per_rank}
            if self.qk_clip is not None:  # QK-clip: every attention head's largest logit [L, H]
                per_rank["head_max"] = self.qk_clip.head_maxima(runner.layout.tp_rank,
                                                                runner.layout.dims.tp)
            summed = runner.reduce_step(model, token_sums=token_sums,
                                        sums={**sums, **exchange_sums}, per_rank=per_rank)
            check_step_fields(summed.packed.shapes, self.step_fields)
            # The redo decision: an attempt whose sync-free expert exchange overflowed its budget
            # on any rank is not the dropless step; it runs again on the same batch, with a
            # budget grown to cover it (nothing of it was applied).
            if not self.moe.exchange_overflowed(summed):
                break
        memory.reset_peak(rt.device)  # the next step's window starts here
        self._stop_requested = summed.item("stop") > 0
        losses = loss_means({name: summed.values(name) for name in token_sums})
        lm_loss, grad_norm = losses["loss"], summed.grad_norm
        mtp = {k: v for k, v in losses.items() if k.startswith("mtp_loss/")}
        if mtp:  # what the MTP term adds to the total loss: lambda / D * sum_k mean CE_k
            losses["mtp_loss"] = mtp_scale / len(mtp) * sum(mtp.values())
        skipped = not all(math.isfinite(v) for v in (*losses.values(), grad_norm))
        columns = self.moe.columns
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            scale_grads_(model.parameters(), clip_coefficient(grad_norm, self.cfg.optim.grad_clip))
            self.optimizer.step()
            if self.qk_clip is not None:
                self.qk_clip.apply_(summed.rank_maximum("head_max"))
            # Aux-loss-free balancing from this step's global load (on the device).
            self.moe.finish_step(None if stats is None else columns.view(summed.device["moe"]))
        host = None if stats is None else columns.view(summed.host("moe"))
        record = {"loss": lm_loss, "lm_loss": lm_loss, **losses, "grad_norm": grad_norm,
                  "skipped": skipped, "top_k": routing.top_k,
                  "memory_peak_gib": summed.maximum("memory_peak") / memory.GIB,
                  **self.moe.exchange_record()}
        if self.qk_clip is not None:  # the step's largest attention logit, before the clip
            record["max_attn_logit"] = summed.maximum("head_max")
        return record, host

    def evaluate(self) -> dict[str, float]:
        """`val_loss`, `val_loss/<source>` and `val_mtp_loss/<k>` (moetrain/evaluation.py) with
        the MoE layers at `train.eval_capacity_factor` (null = dropless), so that they do not
        depend on the training capacity (Megatron and DeepSpeed also keep the two apart); the
        step's training routing is set again afterwards."""
        with self.moe.evaluation(), self._phase("eval"):
            return self.evaluator(self.model, self.runner, self.rt.autocast, self.rt.device)
