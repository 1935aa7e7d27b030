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

from moetrain import memory
from moetrain.checkpoint import CheckpointError, CheckpointManager, TrainState
from moetrain.checkpoint.convert import ModelTensors
from moetrain.config import ConfigError
from moetrain.config.schema import MoetrainConfig
from moetrain.data import DataExhausted, MixtureSampler, ensure_prepared, mixture_datasets, val_steps
from moetrain.data.index import tokenizer_source
from moetrain.metrics import MetricsLogger, summarize_routing
from moetrain.model import (
    Transformer, moe_step_stats, set_capacity_factor, set_recompute, set_top_k, start_moe_step,
    update_expert_bias,
)
from moetrain.model.moe.schedule import capacity_factor_at, top_k_at
from moetrain.model.moe.stats import StatsColumns
from moetrain.model.upcycle import UpcycleError, upcycle_
from moetrain.optim import build_optimizer, lr_at, set_lr
from moetrain.optim.qk_clip import QKClip
from moetrain.parallel import ParallelDims
from moetrain.parallel.context import ParallelContext
from moetrain.parallel.grad_norm import clip_coefficient, scale_grads_
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
        self.par = ParallelContext(dims, rt.device)

        init = cfg.model.init
        if init.from_hf or init.upcycle_from:
            from moetrain.hf.load import use_hf_tokenizer

            use_hf_tokenizer(cfg)  # an imported model keeps its vocabulary
        prepared = ensure_prepared(cfg.data, cfg.model.vocab_size)
        self.tokenizer_path = tokenizer_source(prepared)
        self.train_data, self.val_data = mixture_datasets(
            prepared, cfg.data, t.global_batch_size, t.eval_batches if t.eval_every > 0 else 0)
        # This rank's evaluation micro-batches, fixed for the run: a split too small for one
        # batch is refused now, not at the first evaluation after steps whose work is lost.
        self.eval_steps: list[list[list[int]]] = []
        if t.eval_every > 0:
            n_val = 0 if self.val_data is None else len(self.val_data)
            if n_val < t.global_batch_size:
                raise ConfigError(
                    f"train.eval_every={t.eval_every}: the validation split gives {n_val} "
                    f"evaluation sequences of data.seq_len={cfg.data.seq_len}, fewer than one "
                    f"global batch (train.global_batch_size={t.global_batch_size}); raise "
                    "data.val_fraction (more data per source) or set train.eval_every=0")
            self.eval_steps = val_steps(n_val, t.eval_batches, t.global_batch_size,
                                        t.micro_batch_size, self.par.dp_rank, self.par.dp_size)
        self.sampler = MixtureSampler(
            self.train_data.sizes, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, dp_rank=self.par.dp_rank,
            dp_size=self.par.dp_size, seed=t.seed, weights=self.train_data.weights,
            names=self.train_data.names, on_exhausted=cfg.data.on_exhausted,
        )
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self.micro_batches_per_step = t.global_batch_size // t.micro_batch_size
        self.num_moe_layers = cfg.model.n_layers - cfg.model.moe.first_dense_layers
        self.stats_columns = StatsColumns.of(cfg.model.moe)

        # Built on the meta device and parallelized there; each rank allocates and initialises
        # only its own shards, with values that do not depend on the layout (train.seed).
        memory.reset_peak(rt.device)
        self.model = self.par.build_model(cfg)
        set_recompute(self.model, t.recompute)
        self.ckpt = CheckpointManager(run_dir, cfg.checkpoint.keep_last)
        fresh = self.ckpt.resolve(cfg.checkpoint.resume) is None
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
            self.model, cfg.optim.qk_clip_threshold, cfg.model.n_layers, cfg.model.n_heads)

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
        top = self.par.max_over_ranks([peak])[0] / memory.GIB
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
                "world_size": self.rt.world_size,
                # what `python -m moetrain.hf export` writes as the model's tokenizer
                "tokenizer": str(self.tokenizer_path)}
        path = self.ckpt.save(self.model, self.optimizer, self.state, meta, async_save=background)
        if self.rt.is_main:
            log.info("%s checkpoint %s", "saving" if background else "saved", path)
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        t, c = self.cfg.train, self.cfg.checkpoint
        bad_in_row = 0
        self.preemption = PreemptionWatcher(announce=self.rt.is_main)
        if self.rt.is_main:
            self.metrics = MetricsLogger(
                self.run_dir, self.cfg.logging, t.max_steps,
                resume_step=self.state.step if self.resumed_from else None,
                config_dict=OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True),
            )
            clear_preempted(self.run_dir)
        try:
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = lr_at(step, self.cfg.optim, t.max_steps)
                set_lr(self.optimizer, lr)
                top_k = self._apply_sparsity_schedule(step)
                try:
                    micro_batches = self.sampler.next_step()
                except DataExhausted as err:  # data.on_exhausted=stop
                    if self.rt.is_main:
                        log.info("stopping at step %d: %s", step, err)
                    if c.every > 0 and step % c.every:
                        self.save_checkpoint()
                    break
                start = time.monotonic()
                record, moe_stats = self.train_step(micro_batches)
                elapsed = time.monotonic() - start
                moe = self.cfg.model.moe
                scalars, routing = summarize_routing(moe_stats, self.micro_batches_per_step,
                                                     moe.lbl.coeff, moe.z_loss_coeff, moe.lbl.scope)
                record.update(scalars, total_loss=record["lm_loss"] + scalars["aux_loss"]
                              + scalars["z_loss"])

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
                # The realised mixture: training tokens drawn from each source so far.
                record.update({f"source_tokens/{name}": n * self.cfg.data.seq_len
                               for name, n in self.sampler.consumed().items()})
                if t.eval_every and self.state.step % t.eval_every == 0:
                    record["val_loss"] = self.evaluate()
                if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                    memory.rank_log.debug("step %d: peak memory %.3f GiB", self.state.step,
                                          self.step_peak_bytes / memory.GIB)
                    if self.metrics is not None:
                        if self.init_peak_gib is not None:  # the first record of this process
                            record["memory_init_peak_gib"] = self.init_peak_gib
                            self.init_peak_gib = None
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
        """One optimizer step over this rank's micro-batches. Returns the step's global loss,
        gradient norm and skip flag, and the MoE statistics summed over every rank, on the host
        (None without MoE layers). Reads the device once (plus the expert-parallel count
        exchanges inside the MoE layers)."""
        model, rt, par = self.model, self.rt, self.par
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Scales are chosen so that summing gradients over all micro-batches of all ranks gives
        # the gradient of (mean LM loss over the global batch + mean aux loss per micro-batch).
        start_moe_step(model, aux_loss_scale=1.0 / self.micro_batches_per_step)
        batches = [self.train_data.get_batch(indices).to(rt.device, non_blocking=True)
                   for indices in micro_batches]
        # A loop over the micro-batches, or a pipeline schedule; each micro-batch's summed LM
        # loss is backpropagated divided by the global batch's token count.
        lm_sum = par.forward_backward(model, batches, self.tokens_per_step, rt.autocast)
        stats = moe_step_stats(model, self.num_moe_layers, self.stats_columns, rt.device)
        # Loss, gradient norm, stop flags, every rank's peak memory since the previous step's
        # reduction and the routing statistics: one reduction, one host read.
        self.step_peak_bytes = memory.peak_bytes(rt.device)
        head_max = None if self.qk_clip is None else self.qk_clip.head_maxima(par.tp_rank,
                                                                                par.dims.tp)
        sums = par.step_sums(model, lm_sum, self._wants_to_stop(),
                             None if stats is None else stats.rows_LC, self.step_peak_bytes,
                             maxima=head_max)
        memory.reset_peak(rt.device)  # the next step's window starts here
        self._stop_requested = sums.stop
        lm_loss, grad_norm = sums.lm_sum / self.tokens_per_step, sums.grad_norm
        skipped = not (math.isfinite(lm_loss) and math.isfinite(grad_norm))
        moe = self.cfg.model.moe
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            scale_grads_(model.parameters(), clip_coefficient(grad_norm, self.cfg.optim.grad_clip))
            self.optimizer.step()
            if self.qk_clip is not None:
                self.qk_clip.apply_(sums.maxima)
            if moe.routing.bias_rate > 0 and stats is not None:
                # Aux-loss-free balancing from this step's global load (on the device).
                update_expert_bias(model, self.stats_columns.view(sums.moe_rows).tokens_per_expert)
        host = None if stats is None else self.stats_columns.view(sums.moe_rows_host)
        record = {"loss": lm_loss, "lm_loss": lm_loss, "grad_norm": grad_norm, "skipped": skipped,
                  "memory_peak_gib": max(sums.rank_values) / memory.GIB}
        if self.qk_clip is not None:  # the step's largest attention logit, before the clip
            record["max_attn_logit"] = max(sums.maxima_host)
        return record, host

    def evaluate(self) -> float:
        """Validation loss with the MoE layers at `train.eval_capacity_factor` (null = dropless),
        so that it does not depend on the training capacity (Megatron and DeepSpeed also keep
        the two apart); the scheduled training capacity is restored afterwards."""
        set_capacity_factor(self.model, self.cfg.train.eval_capacity_factor)
        try:
            return self._validation_loss()
        finally:
            step = max(self.state.step - 1, 0)  # the step just trained (the next one resets it)
            set_capacity_factor(self.model, capacity_factor_at(self.cfg.model.moe, step))

    @torch.no_grad()
    def _validation_loss(self) -> float:
        """Mean LM loss over the first `train.eval_batches` global batches of the validation split."""
        assert self.val_data is not None
        model = self.model
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        for micro_batches in self.eval_steps:
            batches = [self.val_data.get_batch(indices).to(self.rt.device)
                       for indices in micro_batches]
            sums += self.par.eval_sums(model, batches, self.rt.autocast).to(sums.device)
        model.train()
        loss_sum, targets = self.par.sum_over_tokens(sums).tolist()
        return loss_sum / targets
