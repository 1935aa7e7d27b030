"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the plain model.

    apply_tensor_parallel(model, tp_mesh)

DTensor `parallelize_module` plans: attention and dense MLPs colwise/rowwise, norms and the
residual stream sequence-sharded, vocab-parallel embedding and output (the loss runs under
`loss_parallel`), MoE layers not TP-sharded (folded: each TP rank routes its own positions),
plain sequence shards at pipeline stage ends. The layout, why DTensor and the constraints:
docs/tensor_parallel.md.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


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
    # A pipeline stage without the embedding / the output head: its ends carry the residual
    # stream as this rank's plain sequence shard [B, S/t, D] (static shapes, no DTensor in the
    # schedule's send/recv), re-wrapped as Shard(1) inside.
    if model.tok_embeddings is None:
        parallelize_module(model, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),)))
    if model.output is None:
        parallelize_module(model, tp_mesh, PrepareModuleOutput(
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
            use_local_output=True))

    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
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
        parallelize_module(block, tp_mesh, plan)
    return model


__all__ = ["apply_tensor_parallel"]
