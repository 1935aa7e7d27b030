"""Regional compilation: torch.compile each transformer block, not the whole model.

    apply_compile(model)   train.compile=true

Every block is compiled separately (as torchtitan does): blocks share their code, so the
compiled graphs are reused, compile time does not grow with depth, and pipeline stages, FSDP
units and activation checkpointing keep working per block. Applied after TP/CP/EP and before
FSDP (FSDP's hooks stay outside the compiled region).

What does not compile (graph breaks, measured with TORCH_LOGS=graph_breaks): the expert GEMMs
outside bf16 (torch.compile traces grouped_mm only in bf16; on the CPU in fp32 they run eagerly),
the MoE layer's check for an activation-checkpoint recompute (`in_backward`), and under expert
parallelism the all-to-all whose sizes come from the host. The local dispatcher has static
shapes (docs/host_syncs.md), so nothing recompiles from step to step.
"""

from __future__ import annotations

from torch import nn

from moetrain.model.block import blocks


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile every block of `model` (its layers and MTP modules' blocks) in place
    (`nn.Module.compile`: parameter names, checkpoints and optimizer groups are unchanged,
    unlike with a torch.compile wrapper)."""
    for block in blocks(model):
        block.compile()
    return model


__all__ = ["apply_compile"]
