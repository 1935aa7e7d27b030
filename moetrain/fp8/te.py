"""The dense linears in FP8 with NVIDIA Transformer Engine (train.fp8_backend=te): GPU only.

    names = convert_linears_te(model, plan)

The linears `moetrain.fp8.linear.wanted` selects become Transformer Engine `Linear`s that
compute under TE's autocast with the recipe's TE counterpart:

    tensorwise   Float8CurrentScaling (per-tensor scales from the current amax; e4m3 forward,
                 e5m2 gradients, as torchao's tensorwise)
    mxfp8        MXFP8BlockScaling (32-element blocks, e8m0 scales; Blackwell)

(no TE recipe scales per row: train.fp8=rowwise with te is refused by moetrain.config.validate).
The routed experts keep torchao's grouped GEMMs (moetrain/fp8/grouped.py): TE's GroupedLinear
takes the split sizes as a host list (a device sync per layer, which moetrain's MoE path never
makes) and one weight tensor per expert (other checkpoint keys). Each TE linear keeps the
nn.Linear's parameter (same name and values) and saves no FP8 state (current and block scaling
keep none), so checkpoints stay plain tensors. Tensor parallelism is refused with this backend
(TE shards through its own process groups, not DTensor: moetrain.parallel.checks). This module
imports transformer_engine only when called; moetrain.fp8.plan checks that it is installed and
that the device is a GPU that runs the recipe.
"""

from __future__ import annotations

from torch import nn

from moetrain.fp8.linear import wanted
from moetrain.fp8.plan import FP8Plan


def te_recipe(plan: FP8Plan):
    """Transformer Engine's recipe object for `plan.recipe`."""
    from transformer_engine.common import recipe

    if plan.recipe == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    if plan.recipe == "mxfp8":
        return recipe.MXFP8BlockScaling()
    raise ValueError(f"Transformer Engine has no recipe for train.fp8={plan.recipe}")


def convert_linears_te(model: nn.Module, plan: FP8Plan) -> list[str]:
    """Swap the wanted nn.Linear modules of `model` (on the meta device) for TE linears; returns
    their names."""
    import transformer_engine.pytorch as te

    recipe = te_recipe(plan)
    # TE >= 2.8 names it autocast(recipe=...), earlier releases fp8_autocast(fp8_recipe=...).
    if hasattr(te, "autocast"):
        def autocast():
            return te.autocast(enabled=True, recipe=recipe)
    else:
        def autocast():
            return te.fp8_autocast(enabled=True, fp8_recipe=recipe)

    class TELinear(te.Linear):
        """te.Linear under TE's autocast with the run's recipe, no extra state in checkpoints."""

        get_extra_state = nn.Module.get_extra_state  # nothing to save: current / block scaling
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            with autocast():
                return super().forward(x)

    names: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or not wanted(name, child, plan):
                continue
            new = TELinear(child.in_features, child.out_features, bias=child.bias is not None,
                           params_dtype=child.weight.dtype, device="meta")
            new.weight = child.weight
            if child.bias is not None:
                new.bias = child.bias
            setattr(parent, child_name, new)
            names.append(name)
    return names


__all__ = ["convert_linears_te", "te_recipe"]
