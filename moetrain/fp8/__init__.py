"""FP8 training (train.fp8; docs/fp8.md): the model's GEMMs from float8 operands, the weights,
optimizer states and checkpoints in high precision.

    plan = resolve_fp8(cfg.train, device)          # None for train.fp8=none (moetrain/fp8/plan.py)
    apply_fp8(model, plan)                         # on the meta device, before TP / EP / FSDP

`apply_fp8` converts the dense linears (torchao, moetrain/fp8/linear.py; or Transformer Engine,
moetrain/fp8/te.py) and gives every MoE layer's routed experts the recipe's grouped GEMM
(moetrain/fp8/grouped.py, through `GroupedExperts.use_gemm`). `moetrain.parallel.parallelize`
calls it first on the model or each pipeline stage.
"""

from __future__ import annotations

import logging

from torch import nn

from moetrain.fp8.plan import ALIGNMENT, FP8Plan, resolve_fp8, torchao_available

log = logging.getLogger(__name__)


def apply_fp8(model: nn.Module, plan: FP8Plan) -> list[str]:
    """Convert `model` (a Transformer or pipeline stage) to compute in FP8 under `plan`, in
    place. Returns the names of the converted linears (the routed experts of every MoE layer
    are converted as well)."""
    from moetrain.fp8.grouped import grouped_gemm
    from moetrain.model.moe.layer import moe_layers

    if plan.backend == "te":
        from moetrain.fp8.te import convert_linears_te

        names = convert_linears_te(model, plan)
    else:
        from moetrain.fp8.linear import convert_linears

        names = convert_linears(model, plan)
    layers = moe_layers(model)
    for layer in layers:
        layer.experts.use_gemm(grouped_gemm(plan))
    log.debug("train.fp8=%s (%s%s): %d float8 linears, the routed experts of %d MoE layers",
              plan.recipe, plan.backend, ", emulated" if plan.emulate else "", len(names),
              len(layers))
    return names


__all__ = ["ALIGNMENT", "FP8Plan", "apply_fp8", "resolve_fp8", "torchao_available"]
