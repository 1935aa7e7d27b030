"""The dense linears in FP8 with torchao: attention projections, dense MLPs, shared experts (and
the output head with train.fp8_output_head).

    names = convert_linears(model, plan)      # the fully qualified names converted

    tensorwise  torchao Float8Linear, recipe "tensorwise": one scale per tensor (448 / amax of
                the whole tensor), e4m3 for inputs and weights, e5m2 (max 57344) for the output
                gradient; with FSDP2, the weights all-gather in float8 (their amax reduced over
                the shards)
    rowwise     torchao Float8Linear, recipe "rowwise": e4m3 everywhere, one power-of-two scale
                per row of each GEMM operand along its reduction dimension
    mxfp8       torchao MXFP8Linear: e4m3 with one e8m0 scale per 32 elements along the
                reduction dimension, RCEIL rounding

Converted: every nn.Linear whose in and out features are multiples of the recipe's alignment
(16; MXFP8: 32), except the output head (unless `plan.output_head`) and the shared experts'
sigmoid gate (one output); the router (a parameter, not a linear), norms and embeddings stay in
high precision. The weights stay the same parameters (same names, dtype and values), so
checkpoints hold plain tensors. Call on the model on the meta device before tensor parallelism
and FSDP (moetrain.parallel.parallelize), as torchtitan does: FSDP2's float8 all-gather then
applies, and the scales come from DTensor reductions over the whole tensor.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from moetrain.fp8.plan import FP8Plan

#: Linears that stay in high precision whatever their shape (fully qualified name endings).
KEEP_HIGH_PRECISION = ("shared_expert_gate",)


def wanted(name: str, linear: nn.Linear, plan: FP8Plan) -> bool:
    """Whether the linear `name` computes in FP8 under `plan` (module docstring)."""
    if name.split(".")[-1] in KEEP_HIGH_PRECISION:
        return False
    if name == "output" and not plan.output_head:
        return False
    align = plan.alignment
    return linear.in_features % align == 0 and linear.out_features % align == 0


def float8_config(plan: FP8Plan):
    """torchao's Float8LinearConfig of the tensorwise / rowwise recipe."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(plan.recipe)
    return dataclasses.replace(config, emulate=plan.emulate,
                               enable_fsdp_float8_all_gather=plan.fsdp_float8_all_gather)


def convert_linears(model: nn.Module, plan: FP8Plan) -> list[str]:
    """Swap the wanted nn.Linear modules of `model` for torchao's float8 linears (in place);
    returns their names."""
    names: list[str] = []

    def keep(module: nn.Module, name: str) -> bool:
        ok = type(module) is nn.Linear and wanted(name, module, plan)
        if ok:
            names.append(name)
        return ok

    if plan.recipe == "mxfp8":
        from torchao.float8.float8_linear_utils import swap_linear_layers

        swap_linear_layers(model, lambda mod: _mxfp8_linear(mod, plan), module_filter_fn=keep)
    else:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, config=float8_config(plan), module_filter_fn=keep)
    return names


def _mxfp8_linear(mod: nn.Linear, plan: FP8Plan) -> nn.Module:
    """torchao's MXFP8Linear holding `mod`'s own parameters."""
    from torchao.prototype.moe_training.mxfp8_linear import MXFP8Linear
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.quantization.quantize_.common import KernelPreference

    kernel = KernelPreference.EMULATED if plan.emulate else KernelPreference.AUTO
    new = MXFP8Linear(mod.in_features, mod.out_features, bias=False, device="meta",
                      kernel_preference=kernel, scale_calculation_mode=ScaleCalculationMode.RCEIL)
    new.weight, new.bias = mod.weight, mod.bias
    return new


__all__ = ["KEEP_HIGH_PRECISION", "convert_linears", "float8_config", "wanted"]
