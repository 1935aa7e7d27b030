"""Tensor parallelism with sequence parallelism (Megatron-style TP + SP) for the plain model.

    apply_tensor_parallel(model, tp_mesh)

Layout of one block over the TP group (t ranks; B batch, S sequence, D model width):

    residual stream     DTensor [B, S, D], Shard(1): each rank holds S/t positions (SP)
    attention_norm,     SequenceParallel: computed on the local positions, weight replicated
    ffn_norm, norm
    attention           input all-gathered to Replicate; wq/wk/wv colwise (a rank owns
                        n_heads/t query and n_kv_heads/t KV heads), wo rowwise with a
                        reduce-scatter back to Shard(1)
    dense mlp           input all-gathered; w1/w3 colwise, w2 rowwise -> Shard(1)
    moe                 NOT tensor-parallel: the layer gets its local [B, S/t, D] positions as a
                        plain tensor and routes only them; the output is wrapped back as
                        Shard(1). This is MoE parallel folding with etp = ep = 1: the TP ranks are
                        expert-data-parallel ranks, so the MoE weights (router, experts, shared
                        experts) stay plain, replicated tensors whose gradients the data-parallel
                        code sums over every rank holding different tokens ("dp_cp_tp").
                        With parallel.ep / etp > 1 the TP ranks may be EP / ETP ranks instead
                        (the experts are sliced over the MoE mesh: expert_parallel).
    tok_embeddings      vocab-parallel (rows sharded), output reduce-scattered to Shard(1)
    stage ends          (pipeline stages without tok_embeddings / output) take / return the
                        residual stream as the local [B, S/t, D] shard: a plain tensor
    output              colwise over the vocabulary: input all-gathered, logits [B, S, V]
                        stay a DTensor Shard(-1); the trainer's cross-entropy runs under
                        `loss_parallel()` (max / sum-exp / target logit all-reduced over TP),
                        so the full [B, S, V] logits are never gathered.

Why DTensor `parallelize_module` rather than hand-written autograd functions (Megatron's
`ColumnParallelLinear` / `_GatherFromSequenceParallelRegion`): the model stays plain PyTorch and
the plan above is the whole TP implementation; every collective and its backward (all-gather <->
reduce-scatter, the all-reduce of the replicated norm weights' gradients) comes from DTensor's
placement rules, which are exact and tested upstream; the parameters become DTensors that FSDP2
(2-D with the dp_cp mesh), DCP checkpoints (resharding across TP sizes) and the gradient-norm
code understand without extra metadata. The cost is DTensor's per-op dispatch overhead on the
residual stream, small next to the GEMMs at real sizes.

The residual stream is kept a DTensor (`use_local_output=False`), not a local tensor as in
torchtitan: the model's code then sees global shapes (`Transformer.forward` builds its RoPE
positions from `h.shape[1]`), so nothing in `moetrain.model` knows about TP.

With a capacity factor each TP rank drops among its own S/t positions (the capacity follows the
local token count, as with Megatron-Core's per-rank capacity), so runs that drop tokens are not
token-for-token comparable with one process; dropless runs are exact.

Constraints (checked by `moetrain.parallel.checks`): n_heads, n_kv_heads, the sequence length and
(with dense layers) ffn_hidden divisible by t. Equal sequence shards matter beyond shapes: the
MoE layers' aux losses are per-rank shares of the micro-batch's loss (`MoELayer.token_shards`).
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
