"""Muon for the hidden matrices, AdamW for the rest, on any parallel layout (optim.name=muon).

    opt = Muon(muon_params, adamw_groups, lr=..., weight_decay=..., momentum=0.95, ...)

The update of every Muon matrix is `torch.optim.Muon`'s on one process (Jordan et al. 2024,
"Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is Scalable
for LLM Training", arXiv:2502.16982, for the RMS-matched scale):

    B <- mu B + (1 - mu) g                          the momentum buffer (torch's lerp form)
    U =  lerp(g, B, mu) with Nesterov, else B
    O =  NS_k(U)                                    k quintic Newton-Schulz steps (bf16, or fp32
                                                    with optim.ns_dtype) on the WHOLE matrix
    W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O   ("match_rms_adamw")

for W [m, n], g its gradient (after clipping); B, U, O the same shape.

A 2-D parameter is one matrix; a 3-D expert stack [E, m, n] is E matrices, each orthogonalised
on its own. Momentum, decay and the update are elementwise and run on this rank's shard; only
Newton-Schulz needs the whole matrix, which `MatrixExchange` (moetrain/parallel/whole_matrices.py)
gathers on one owner rank and scatters back (in bf16: Newton-Schulz casts its input to bf16
first, so moving bf16 changes nothing). The momentum buffer is a tensor like the parameter (a
DTensor with its placements), so checkpoints save and reshard it like AdamW's moments.

The other parameters (embeddings, output head, norms, router) take torch.optim.AdamW, whose
groups and state this optimizer holds: one optimizer for the trainer, `state_dict`, DCP and
the learning-rate schedule. docs/optimizers.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moetrain.parallel.whole_matrices import MatrixExchange

try:  # torch's own Newton-Schulz (torch >= 2.9, private module)
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS
    from torch.optim._muon import _zeropower_via_newtonschulz as _torch_newton_schulz
except ImportError:  # pragma: no cover - the same constants, if a torch moves them
    DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS = 3.4445, -4.7750, 2.0315, 1e-7
    _torch_newton_schulz = None

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def newton_schulz(G: torch.Tensor, steps: int, coefficients=NS_COEFFICIENTS, eps: float = EPS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonalised [m, n] matrix of G [m, n] (in `dtype`): torch.optim.Muon's quintic
    iteration, which computes in bf16."""
    if dtype == torch.bfloat16 and _torch_newton_schulz is not None:
        return _torch_newton_schulz(G, coefficients, steps, eps)
    # Own loop: torch's function computes only in bf16 (and fp32 is optim.ns_dtype=fp32);
    # the same steps, in the same order.
    a, b, c = coefficients
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if G.size(0) > G.size(1) else X


def rms_scale(shape: Sequence[int]) -> float:
    """0.2 sqrt(max(m, n)) of an [m, n] matrix: Muon's update then has AdamW's RMS
    (torch.optim.Muon's adjust_lr_fn="match_rms_adamw")."""
    m, n = shape[-2:]
    return 0.2 * math.sqrt(max(m, n))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Muon(torch.optim.Optimizer):
    """Muon for `muon_params` ((name, parameter) pairs: 2-D matrices or 3-D stacks of them,
    plain tensors or DTensors of any mesh), torch.optim.AdamW for `adamw_groups` (param group
    dicts). Hyper-parameters: `lr` and `weight_decay` for both (the Muon update is RMS-matched
    to AdamW's), `momentum`, `nesterov`, `ns_steps` for Muon, `betas`, `eps` for AdamW;
    `adamw_kwargs` go to torch.optim.AdamW (fused / foreach).

    Construction is collective when the default process group has several ranks (the
    whole-matrix plan). `step` reads nothing from the device."""

    def __init__(self, muon_params: Sequence[tuple[str, nn.Parameter]],
                 adamw_groups: list[dict[str, Any]], *, lr: float, weight_decay: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 **adamw_kwargs: Any) -> None:
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps,
                                        **adamw_kwargs)
        for g in self._adamw.param_groups:
            g["algorithm"] = "adamw"
        muon_group = {"params": [p for _, p in muon_params], "algorithm": "muon", "lr": lr,
                      "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                      "ns_steps": ns_steps, "ns_coefficients": NS_COEFFICIENTS, "eps": EPS}
        self.ns_dtype = ns_dtype  # not a group entry: a checkpoint may be resumed with the other
        super().__init__([*self._adamw.param_groups, muon_group], {"lr": lr})
        self.muon_names = [n for n, _ in muon_params]
        self.exchange = MatrixExchange(list(muon_params))

    def _muon_group(self) -> dict[str, Any]:
        return next(g for g in self.param_groups if g["algorithm"] == "muon")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # AdamW works on this optimizer's groups and state (re-linked every step: loading a
        # state dict replaces both objects).
        self._adamw.param_groups = [g for g in self.param_groups if g["algorithm"] == "adamw"]
        self._adamw.state = self.state
        self._adamw.step()
        self._muon_step(self._muon_group())
        return loss

    @torch.no_grad()
    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        inputs, stepped = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:  # every rank of a matrix has it or none does; torch skips it
                inputs.append(torch.zeros_like(_local(p), dtype=self.ns_dtype))
                stepped.append(False)
                continue
            if isinstance(grad, DTensor) and grad.placements != p.placements:
                grad = grad.redistribute(p.device_mesh, p.placements)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            g, buf = _local(grad), _local(state["momentum_buffer"])
            buf.lerp_(g, 1 - mu)
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            # Newton-Schulz starts by casting to its dtype: in bf16 the same values, half the
            # bytes to move.
            inputs.append(update.to(self.ns_dtype))
            stepped.append(True)
        steps, coefficients, eps = group["ns_steps"], group["ns_coefficients"], group["eps"]
        outs = self.exchange.apply(
            inputs, lambda whole: newton_schulz(whole, steps, coefficients, eps, self.ns_dtype))
        for p, out, did in zip(group["params"], outs, stepped):
            if not did:
                continue
            w = _local(p)
            w.mul_(1 - lr * wd)
            w.add_(out, alpha=-lr * rms_scale(p.shape))


__all__ = ["Muon", "NS_COEFFICIENTS", "newton_schulz", "rms_scale"]
