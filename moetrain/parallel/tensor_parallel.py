"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the plain model.

    apply_tensor_parallel(model, tp_mesh)

DTensor `parallelize_module` plans: attention and dense MLPs colwise/rowwise, norms and the
residual stream sequence-sharded, vocab-parallel embedding and output (the loss runs under
`loss_parallel`), MoE layers not TP-sharded (folded: each TP rank routes its own positions),
plain sequence shards at pipeline stage ends. The layout, why DTensor and the constraints:
docs/tensor_parallel.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from moetrain.model.block import TransformerBlock, blocks
from moetrain.model.mla import MultiHeadLatentAttention


class ReplicatedLatent(ParallelStyle):
    """A module every TP rank computes whole on the replicated input (MLA's low-rank q and kv
    projections, their norms, the shared rotary key): parameters become Replicate DTensors, so
    the per-rank partial gradients (each rank's heads) are summed like those of the
    sequence-parallel norms. `local_output`: hand the output to the per-head code as a plain
    tensor whose gradient is this rank's partial sum."""

    def __init__(self, local_output: bool = False):
        super().__init__()
        self.local_output = local_output

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def params(name, mod, mesh):
            for p_name, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(p_name, nn.Parameter(
                    DTensor.from_local(p, mesh, [Replicate()], run_check=False)))

        def inputs(mod, args, mesh):
            x = args[0]
            if isinstance(x, DTensor):
                return (x.redistribute(mesh, [Replicate()]), *args[1:])
            return (DTensor.from_local(x, mesh, [Replicate()], run_check=False), *args[1:])

        def outputs(mod, out, mesh):
            return out.to_local(grad_placements=(Partial(),)) if self.local_output else out

        return distribute_module(module, mesh, params, inputs, outputs)


class ShardedProjectionNorm(ParallelStyle):
    """An RMSNorm over a whole colwise-sharded projection (OLMoE's q/k norm): its weight is
    Shard(0) like the projection's output features, the statistics are reduced over the TP
    ranks by DTensor; the input and output are this rank's plain [B, S, n / tp] slice."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def params(name, mod, mesh):
            for p_name, p in list(mod.named_parameters(recurse=False)):
                local = torch.chunk(p.detach(), mesh.size(), 0)[mesh.get_local_rank()]
                mod.register_parameter(p_name, nn.Parameter(
                    DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False)))

        def inputs(mod, args, mesh):
            x = args[0]
            return (DTensor.from_local(x, mesh, [Shard(x.dim() - 1)], run_check=False),)

        return distribute_module(module, mesh, params, inputs, lambda mod, out, mesh: out.to_local())


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` (a `moetrain.model.Transformer`) over the 1-D `tp_mesh`, in place.

    Call on every rank with the same full model, before data parallelism (FSDP shards the TP
    shards further) and before building the optimizer (parameters become DTensors).
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh}")
    if tp_mesh.size() == 1:
        return model
    tied = (model.tok_embeddings is not None and model.output is not None
            and model.output.weight is model.tok_embeddings.weight)
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        )
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False
        )
    if top:
        parallelize_module(model, tp_mesh, top)
    if tied:  # each style made its own DTensor; both are Shard(0) over the vocabulary
        model.output.weight = model.tok_embeddings.weight
    # A pipeline stage after the first / before the last: its ends carry the residual stream
    # as this rank's plain sequence shard [B, S/t, D] (static shapes, no DTensor in the
    # schedule's send/recv), re-wrapped as Shard(1) inside.
    if model.takes_hidden:
        parallelize_module(model, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),)))
    if model.output is None:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
            use_local_output=True))
    for module in (model.mtp or {}).values():
        # The MTP module's norms on the sequence shards; its projection [2d -> d] colwise on the
        # whole sequence, back to sequence shards for its block (Megatron-Core shards it so).
        parallelize_module(module, tp_mesh, {
            "enorm": SequenceParallel(),
            "hnorm": SequenceParallel(),
            "eh_proj": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1),
                                       use_local_output=False),
            "norm": SequenceParallel(),
        })
    for block in blocks(model):
        parallelize_module(block, tp_mesh, _block_plan(block))
    return model


def _block_plan(block: TransformerBlock) -> dict[str, ParallelStyle]:
    """Attention heads and the dense MLP colwise/rowwise; norms and residuals sequence-sharded;
    the MoE layer on this rank's positions."""
    plan: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        ),
        **_attention_plan(block.attention),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
    }
    if block.mlp is not None:
        plan.update({
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "mlp.w1": ColwiseParallel(),
            "mlp.w3": ColwiseParallel(),
            "mlp.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })
    if block.moe is not None:
        # Each rank routes its own S/t positions: no communication in or out of the layer.
        plan["moe"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
            use_local_input=True,
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
            use_local_output=False,
        )
    return plan


def _attention_plan(attention: nn.Module) -> dict[str, ParallelStyle]:
    """Heads colwise; MLA's latent path and shared rotary key replicated; q/k norms per head
    on this rank's heads (dim 2 of [B, S, H, d]) or over the sharded projection."""
    if isinstance(attention, MultiHeadLatentAttention):
        plan: dict[str, ParallelStyle] = {
            "attention.wkv_a": ReplicatedLatent(),
            "attention.kv_a_norm": ReplicatedLatent(),
            "attention.wkv_b": ColwiseParallel(),
            "attention.wk_rope": ReplicatedLatent(local_output=True),
        }
        if attention.wq is not None:
            plan["attention.wq"] = ColwiseParallel()
        else:
            plan.update({"attention.wq_a": ReplicatedLatent(),
                         "attention.q_a_norm": ReplicatedLatent(),
                         "attention.wq_b": ColwiseParallel()})
        return plan
    plan = {f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
    if attention.qk_norm == "head":
        plan.update({f"attention.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
                     for n in ("q_norm", "k_norm")})
    elif attention.qk_norm == "full":
        plan.update({f"attention.{n}": ShardedProjectionNorm() for n in ("q_norm", "k_norm")})
    return plan


__all__ = ["ReplicatedLatent", "ShardedProjectionNorm", "apply_tensor_parallel"]
