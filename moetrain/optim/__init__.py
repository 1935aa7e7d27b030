"""The optimizers (optim.name: adamw, or muon with AdamW for what is not a hidden matrix) and
the warmup-then-decay learning-rate schedule. docs/optimizers.md."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from moetrain.config import ConfigError
from moetrain.config.schema import OptimConfig

# optim.name=muon: which parameters are Muon's hidden matrices and which stay with AdamW, by
# full name (pipeline stages and compiled blocks keep these names). A parameter matching
# neither is refused: a new kind of parameter must be routed on purpose.
# A block: a layer of the model, or a multi-token prediction module's (model.mtp).
_BLOCK = r"(layers\.\d+|mtp\.\d+\.block)"
MUON_PARAMETERS = (
    _BLOCK + r"\.attention\.(wq|wk|wv|wo|wq_a|wq_b|wkv_a|wkv_b|wk_rope)\.weight",
    _BLOCK + r"\.mlp\.w[123]\.weight",
    _BLOCK + r"\.moe\.shared_experts\.w[123]\.weight",
    _BLOCK + r"\.moe\.experts\.w[123]",  # [E, m, n]: each expert's matrix separately
    r"mtp\.\d+\.eh_proj\.weight",  # the MTP module's [D, 2D] projection: a hidden matrix
)
ADAMW_PARAMETERS = (
    r"tok_embeddings\.weight",
    r"output\.weight",
    r"(.+\.)?\w*norm\.weight",  # RMSNorm gains
    r".+\.bias",
    _BLOCK + r"\.moe\.router\.weight",
    _BLOCK + r"\.moe\.shared_expert_gate\.weight",
)


#: fp32 optimizer state per parameter element: AdamW's exp_avg + exp_avg_sq; Muon's momentum_buffer
ADAMW_STATE_BYTES = 8
MUON_STATE_BYTES = 4


def state_bytes_per_element(optimizer: str, name: str) -> int:
    """Bytes of optimizer state each element of the parameter called `name` (as
    `named_parameters()` names it) holds under optimizer `optimizer` (optim.name), by the same
    rules that route it: 8 for AdamW's two fp32 moments, 4 for a Muon matrix's fp32 momentum
    buffer (the unpadded shard, as the state is allocated). The planner asks it through
    `planning.optimizer_state_bytes`. Raises ValueError for an optimizer moetrain does not build."""
    if optimizer == "adamw":
        return ADAMW_STATE_BYTES
    if optimizer == "muon":
        muon = any(re.fullmatch(rule, name) for rule in MUON_PARAMETERS)
        return MUON_STATE_BYTES if muon else ADAMW_STATE_BYTES
    raise ValueError(f"optim.name={optimizer}: moetrain builds adamw or muon "
                     "(moetrain.optim.state_bytes_per_element)")


def _decays(name: str, param: torch.Tensor) -> bool:
    # Norm gains and biases are 1-D; decaying them only pulls them to zero without regularising.
    return param.ndim >= 2 and not name.endswith(".bias")


def _adamw_groups(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    decay = [p for n, p in named if _decays(n, p)]
    no_decay = [p for n, p in named if not _decays(n, p)]
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _adamw_kwargs(model: nn.Module) -> dict:
    # foreach=False keeps the update order fixed per tensor, which bit-exact resume relies on;
    # on GPU the fused kernel is both faster and deterministic.
    fused = next(model.parameters()).is_cuda
    return {"fused": fused or None, "foreach": False if not fused else None}


def route_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]],
                                                list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) trainable (name, parameter) pairs by MUON_PARAMETERS /
    ADAMW_PARAMETERS. Raises ConfigError naming a parameter that matches neither, or a Muon
    one that is not a matrix or a stack of them."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(re.fullmatch(rule, name) for rule in MUON_PARAMETERS):
            if p.ndim not in (2, 3):
                raise ConfigError(f"optim.name=muon: parameter {name} {list(p.shape)} is routed to "
                                  "Muon but is not a matrix or a stack of matrices")
            muon.append((name, p))
        elif any(re.fullmatch(rule, name) for rule in ADAMW_PARAMETERS):
            adamw.append((name, p))
        else:
            raise ConfigError(
                f"optim.name=muon: parameter {name} {list(p.shape)} is neither a Muon matrix nor "
                "an AdamW parameter; route it in moetrain/optim/__init__.py (MUON_PARAMETERS "
                "or ADAMW_PARAMETERS), or use optim=adamw")
    return muon, adamw


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of `cfg.name` over the model's trainable parameters (sharded or not):
    torch.optim.AdamW with decay on matrices only, or `Muon` (moetrain/optim/muon.py) with
    AdamW for the rest. With several ranks every rank must call it (Muon plans its
    communication). Raises ConfigError for a parameter Muon cannot route."""
    if cfg.name == "muon":
        from moetrain.optim.muon import Muon

        muon, adamw = route_parameters(model)
        return Muon(muon, _adamw_groups(adamw, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                    momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                    ns_dtype=torch.float32 if cfg.ns_dtype == "fp32" else torch.bfloat16,
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **_adamw_kwargs(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(_adamw_groups(named, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **_adamw_kwargs(model))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
