"""Value checks run before training starts: every failure names the key and what would be valid.

Unknown keys, wrong types and values outside a choice list are already refused by Hydra against
the dataclass schema; this module checks ranges and the relations between keys (and the choices
again, for configs built in Python). The parallel layout is checked by
`moetrain.parallel.checks.check_layout`, which needs the world size.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any, Iterable

from moetrain.config.families import family_problems
from moetrain.config.schema import Choice, MoetrainConfig, head_dim_of


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the valid values."""


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {valid}")


def _positive(key: str, value: Any) -> None:
    _require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")


def _non_negative(key: str, value: Any) -> None:
    _require(isinstance(value, (int, float)) and value >= 0, key, value, "must be >= 0")


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    _require(value in choices, key, value, "must be one of " + ", ".join(choices))


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_choices(node: Any, prefix: str) -> None:
    """Every `Choice`-typed field of a dataclass tree holds one of its values."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        kind = hints.get(f.name)
        if isinstance(kind, type) and issubclass(kind, Choice):
            _choice(key, value, kind.values())
        elif dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")


def validate(cfg: MoetrainConfig) -> None:
    """Check every value of `cfg`; raise ConfigError on the first bad one."""
    _check_choices(cfg, "")
    m, moe = cfg.model, cfg.model.moe
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        _positive(f"model.{key}", getattr(m, key))
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
             f"must divide model.n_heads={m.n_heads} (grouped-query attention)")
    if m.head_dim is None:
        _require(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
                 f"must be divisible by model.n_heads={m.n_heads} when model.head_dim is null")
    else:
        _positive("model.head_dim", m.head_dim)
    head_dim = head_dim_of(m)
    if m.attention == "gqa":
        _require(head_dim % 2 == 0, "model.head_dim", head_dim, "must be even (rotary embeddings)")
    else:
        _validate_mla(m)
    _validate_rope_scaling(m.rope_scaling)
    _positive("model.max_position_embeddings", m.max_position_embeddings)
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _require(0 < m.norm_eps < 1, "model.norm_eps", m.norm_eps, "must be in (0, 1)")
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")
    _positive("model.init.upcycle_granularity", m.init.upcycle_granularity)
    if m.init.upcycle_from is not None:
        _require(Path(m.init.upcycle_from).exists(), "model.init.upcycle_from", m.init.upcycle_from,
                 "must name a dense moetrain checkpoint (a step_<N> folder or a run directory) "
                 "or a dense Hugging Face Llama / Qwen3 folder")
    if m.init.from_hf is not None:
        _require((Path(m.init.from_hf) / "config.json").is_file(), "model.init.from_hf",
                 m.init.from_hf, "must name a Hugging Face model folder (with config.json)")
        _require(m.family != "custom", "model.family", str(m.family),
                 "must name the checkpoint's family when model.init.from_hf is set "
                 "(python -m moetrain.hf overrides DIR prints it)")
        _require(m.init.upcycle_from is None, "model.init.upcycle_from", m.init.upcycle_from,
                 "cannot be combined with model.init.from_hf (one initial state)")
    for key, why in family_problems(m):
        raise ConfigError(f"{key}={_value_of(cfg, key)!r} is invalid: {why}")

    _positive("model.moe.num_experts", moe.num_experts)
    _require(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k", moe.top_k,
             f"must be in [1, model.moe.num_experts={moe.num_experts}]")
    _positive("model.moe.expert_hidden", moe.expert_hidden)
    _require(0 <= moe.first_dense_layers <= m.n_layers, "model.moe.first_dense_layers",
             moe.first_dense_layers, f"must be in [0, model.n_layers={m.n_layers}]")
    _non_negative("model.moe.num_shared_experts", moe.num_shared_experts)
    if moe.shared_expert_hidden is not None:
        _positive("model.moe.shared_expert_hidden", moe.shared_expert_hidden)
    if moe.capacity_factor is not None:
        _require(moe.capacity_factor > 0, "model.moe.capacity_factor", moe.capacity_factor,
                 "must be > 0, or null for dropless routing")
    _require(not moe.pad_to_capacity or moe.capacity_factor is not None,
             "model.moe.pad_to_capacity", moe.pad_to_capacity,
             "needs model.moe.capacity_factor to be set (padding is to the capacity)")
    if moe.token_rounding is not None:
        _require(isinstance(moe.token_rounding, int) and not isinstance(moe.token_rounding, bool)
                 and moe.token_rounding >= 1, "model.moe.token_rounding", moe.token_rounding,
                 "must be a positive integer (the GEMM tile, e.g. 128) or null")
    if moe.ep_budget is not None:
        _require(moe.ep_budget > 0, "model.moe.ep_budget", moe.ep_budget,
                 "must be > 0 (a factor of the balanced load, e.g. 1.5), or null for exact-size "
                 "buffers")
    _require(moe.routed_scaling_factor > 0, "model.moe.routed_scaling_factor",
             moe.routed_scaling_factor, "must be > 0")
    _require(not moe.shared_expert_gate or moe.num_shared_experts > 0,
             "model.moe.shared_expert_gate", moe.shared_expert_gate,
             "needs model.moe.num_shared_experts > 0")
    _non_negative("model.moe.lbl.coeff", moe.lbl.coeff)
    _non_negative("model.moe.z_loss_coeff", moe.z_loss_coeff)
    _validate_schedule("model.moe.schedule.top_k", moe.schedule.top_k, moe.top_k,
                       _top_k_range(moe.num_experts))
    _validate_schedule("model.moe.schedule.capacity_factor", moe.schedule.capacity_factor,
                       moe.capacity_factor, _capacity_range)
    _validate_routing(moe)
    _validate_mtp(m.mtp)

    _validate_data(cfg)

    o = cfg.optim
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "must be a finite number > 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _non_negative("optim.weight_decay", o.weight_decay)
    _require(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "must be in [0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "must be > 0")
    _non_negative("optim.warmup_steps", o.warmup_steps)
    _non_negative("optim.grad_clip", o.grad_clip)
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(1 <= o.ns_steps < 100, "optim.ns_steps", o.ns_steps,
             "must be in [1, 99] (Newton-Schulz iterations)")
    if o.qk_clip_threshold is not None:
        _require(o.qk_clip_threshold > 0 and math.isfinite(o.qk_clip_threshold),
                 "optim.qk_clip_threshold", o.qk_clip_threshold,
                 "must be a finite number > 0 (the largest attention logit allowed), or null")
        _require(m.qk_norm == "none", "optim.qk_clip_threshold", o.qk_clip_threshold,
                 f"needs model.qk_norm=none (got {m.qk_norm}): the q/k norms undo the projection "
                 "scaling QK-clip applies; they bound the logits themselves")

    t = cfg.train
    _positive("train.max_steps", t.max_steps)
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.log_every", t.log_every)
    _positive("train.max_bad_steps", t.max_bad_steps)
    _non_negative("train.eval_every", t.eval_every)
    _positive("train.eval_batches", t.eval_batches)
    if t.eval_capacity_factor is not None:
        _require(t.eval_capacity_factor > 0, "train.eval_capacity_factor", t.eval_capacity_factor,
                 "must be > 0, or null for dropless evaluation")
    if t.max_time is not None:
        _require(t.max_time > 0, "train.max_time", t.max_time, "must be > 0 seconds, or null")
    _validate_fp8(cfg)

    f = cfg.fault
    for key in ("init_timeout", "step_timeout", "heartbeat_timeout"):
        _require(getattr(f, key) > 0, f"fault.{key}", getattr(f, key), "must be > 0 seconds")
    _require(f.slow_step_factor > 1, "fault.slow_step_factor", f.slow_step_factor, "must be > 1")

    c = cfg.checkpoint
    _non_negative("checkpoint.every", c.every)
    _require(bool(c.resume), "checkpoint.resume", c.resume, "must be auto, never or a checkpoint path")
    if c.keep_last is not None:
        _positive("checkpoint.keep_last", c.keep_last)

    if cfg.logging.wandb.enabled:
        _require(_importable("wandb"), "logging.wandb.enabled", True,
                 "wandb is not installed: pip install 'moetrain[wandb]', or set it to false")
    if cfg.logging.tensorboard:
        _require(_importable("tensorboard"), "logging.tensorboard", True,
                 "tensorboard is not installed: pip install 'moetrain[tensorboard]', or set it to false")


def _validate_fp8(cfg: MoetrainConfig) -> None:
    """train.fp8 and its companions (docs/fp8.md); what the device runs is checked by
    moetrain.fp8.resolve_fp8, what the layout allows by moetrain.parallel.check_layout."""
    t, m = cfg.train, cfg.model
    if t.fp8 == "none":
        _require(t.fp8_backend == "torchao", "train.fp8_backend", str(t.fp8_backend),
                 "needs train.fp8 set (tensorwise, rowwise or mxfp8)")
        _require(not t.fp8_output_head, "train.fp8_output_head", t.fp8_output_head,
                 "needs train.fp8 set (tensorwise, rowwise or mxfp8)")
        return
    _require(not (t.fp8_backend == "te" and t.fp8 == "rowwise"), "train.fp8", str(t.fp8),
             "has no Transformer Engine recipe (it scales per tensor or per block): use "
             "tensorwise or mxfp8 with train.fp8_backend=te, or train.fp8_backend=torchao")
    _require(not (t.fp8_output_head and m.tie_embeddings), "train.fp8_output_head",
             t.fp8_output_head, "cannot be combined with model.tie_embeddings=true (the "
             "embedding shares the output head's weight); untie them or set it to false")
    align = 32 if t.fp8 == "mxfp8" else 16
    for key, value in (("model.d_model", m.d_model),
                       ("model.moe.expert_hidden", m.moe.expert_hidden)):
        _require(value % align == 0, key, value,
                 f"must be a multiple of {align} with train.fp8={t.fp8} (the routed experts' "
                 "FP8 GEMMs quantize along it)")


def _value_of(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node.value if isinstance(node, Choice) else node


def _validate_mla(m: Any) -> None:
    mla = m.mla
    _require(m.n_kv_heads == m.n_heads, "model.n_kv_heads", m.n_kv_heads,
             f"must equal model.n_heads={m.n_heads} with model.attention=mla (every head has "
             "its own key and value, rebuilt from the latent)")
    _require(m.qk_norm == "none", "model.qk_norm", m.qk_norm,
             "must be none with model.attention=mla (the latents have their own norms)")
    if mla.q_lora_rank is not None:
        _positive("model.mla.q_lora_rank", mla.q_lora_rank)
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _positive(f"model.mla.{key}", getattr(mla, key))
    _require(mla.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim", mla.qk_rope_head_dim,
             "must be even (rotary embeddings)")


def _validate_rope_scaling(rs: Any) -> None:
    if rs.kind == "none":
        return
    _require(rs.factor >= 1, "model.rope_scaling.factor", rs.factor, "must be >= 1")
    _positive("model.rope_scaling.original_max_position_embeddings",
              rs.original_max_position_embeddings)
    # Equal counts are a step instead of a ramp (Kimi K2 ships beta_fast = beta_slow = 1).
    _require(rs.beta_fast >= rs.beta_slow > 0, "model.rope_scaling.beta_fast", rs.beta_fast,
             f"must be >= model.rope_scaling.beta_slow={rs.beta_slow} > 0")
    _non_negative("model.rope_scaling.mscale", rs.mscale)
    _non_negative("model.rope_scaling.mscale_all_dim", rs.mscale_all_dim)


def _validate_data(cfg: MoetrainConfig) -> None:
    """Keys and values of data.*; the files themselves are checked when the data is prepared."""
    from moetrain.data.errors import DataError
    from moetrain.data.sources import resolve_sources

    d = cfg.data
    _require(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be an integer >= 2")
    _require(0 <= d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in [0, 0.5)")
    if d.num_workers is not None:
        _positive("data.num_workers", d.num_workers)
    if d.tokenizer.vocab_size is not None:
        _positive("data.tokenizer.vocab_size", d.tokenizer.vocab_size)
        _require(d.tokenizer.vocab_size <= cfg.model.vocab_size, "data.tokenizer.vocab_size",
                 d.tokenizer.vocab_size, f"must be <= model.vocab_size={cfg.model.vocab_size} "
                 "(the model embeds every token)")
    try:
        resolve_sources(d)  # names, weights, corpus vs sources
    except DataError as err:
        raise ConfigError(str(err)) from None


def _validate_mtp(mtp: Any) -> None:
    _require(isinstance(mtp.depth, int) and not isinstance(mtp.depth, bool) and mtp.depth >= 0,
             "model.mtp.depth", mtp.depth,
             "must be an integer >= 0 (multi-token prediction depths; 0 = off)")
    _require(_is_number(mtp.loss_scale) and mtp.loss_scale >= 0, "model.mtp.loss_scale",
             mtp.loss_scale, "must be a number >= 0")
    _validate_schedule("model.mtp.loss_scale_schedule", mtp.loss_scale_schedule, mtp.loss_scale,
                       _loss_scale_range)


def _loss_scale_range(key: str, value: Any) -> None:
    _require(_is_number(value) and value >= 0, key, value, "must be a number >= 0")


def _validate_routing(moe: Any) -> None:
    r, key = moe.routing, "model.moe.routing"
    if r.top_p is not None:
        _require(0 < r.top_p <= 1, f"{key}.top_p", r.top_p, "must be in (0, 1], or null for plain top-k")
        _require(1 <= r.min_k <= moe.top_k, f"{key}.min_k", r.min_k,
                 f"must be in [1, model.moe.top_k={moe.top_k}]")
    _non_negative(f"{key}.bias_rate", r.bias_rate)
    _non_negative(f"{key}.num_null_experts", r.num_null_experts)
    _require(isinstance(r.num_null_experts, int), f"{key}.num_null_experts", r.num_null_experts,
             "must be an integer >= 0")
    if r.group_mode != "none":
        _require(r.num_null_experts == 0, f"{key}.group_mode", r.group_mode,
                 f"cannot be combined with {key}.num_null_experts > 0")
        _positive(f"{key}.num_groups", r.num_groups)
        _require(moe.num_experts % r.num_groups == 0, f"{key}.num_groups", r.num_groups,
                 f"must divide model.moe.num_experts={moe.num_experts}")
    if r.group_mode == "balanced":
        _require(moe.top_k % r.num_groups == 0, f"{key}.num_groups", r.num_groups,
                 f"must divide model.moe.top_k={moe.top_k} (equal picks per group)")
    if r.group_mode == "limited":
        _require(1 <= r.topk_groups <= r.num_groups, f"{key}.topk_groups", r.topk_groups,
                 f"must be in [1, {key}.num_groups={r.num_groups}]")
        group_size = moe.num_experts // r.num_groups
        _require(moe.top_k <= r.topk_groups * group_size, f"{key}.topk_groups", r.topk_groups,
                 f"keeps {r.topk_groups * group_size} experts, fewer than model.moe.top_k={moe.top_k}")


def _top_k_range(num_experts: int):
    def check(key: str, value: Any) -> None:
        ok = _is_number(value) and float(value).is_integer() and 1 <= value <= num_experts
        _require(ok, key, value, f"must be an integer in [1, model.moe.num_experts={num_experts}]")
    return check


def _capacity_range(key: str, value: Any) -> None:
    _require(_is_number(value) and value > 0, key, value, "must be a number > 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_schedule(key: str, sched: Any, default: Any, check_value) -> None:
    """A `ValueSchedule`: kind, steps, milestones, and every value it can take via check_value."""
    for name in ("start_step", "end_step"):
        value = getattr(sched, name)
        _require(isinstance(value, int) and value >= 0, f"{key}.{name}", value,
                 "must be an integer >= 0")
    for name in ("start", "end"):
        if getattr(sched, name) is not None:
            check_value(f"{key}.{name}", getattr(sched, name))
    if sched.kind in ("linear", "cosine"):
        _require(sched.end_step > sched.start_step, f"{key}.end_step", sched.end_step,
                 f"must be > {key}.start_step={sched.start_step} for a {sched.kind} schedule")
        for name in ("start", "end"):
            _require(getattr(sched, name) is not None or default is not None, f"{key}.{name}",
                     None, f"must be set for a {sched.kind} schedule when the static value is null")
    if sched.kind == "step":
        milestones = list(sched.milestones)
        _require(len(milestones) > 0, f"{key}.milestones", milestones,
                 "must list at least one [step, value] pair for a step schedule")
        previous = -1
        for i, m in enumerate(milestones):
            pair = None if isinstance(m, (str, bytes)) or not hasattr(m, "__len__") else list(m)
            _require(pair is not None and len(pair) == 2, f"{key}.milestones[{i}]", m,
                     "must be a [step, value] pair")
            m_step, m_value = pair
            _require(isinstance(m_step, int) and not isinstance(m_step, bool) and m_step > previous,
                     f"{key}.milestones[{i}]", pair,
                     "the step must be an integer >= 0, greater than the previous milestone's")
            check_value(f"{key}.milestones[{i}]", m_value)
            previous = m_step
