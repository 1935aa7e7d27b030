"""Record every collective a piece of code issues on this rank (op, group ranks, bytes).

    with CollectiveRecorder() as rec:
        trainer.train_step(batches)
    rec.calls        # [RecordedCall(op, ranks, bytes), ...] in issue order
    rec.totals()     # {(op, ranks): (calls, bytes)}: comparable with plan_comm.by_op_and_group

A TorchDispatchMode sees the c10d ops every torch.distributed call dispatches (the ProcessGroup
API, FSDP2, pipelining's send/recv) and the functional collectives DTensor and expert
parallelism use, with their tensors and group. Hand-written rather than
`torch.distributed.tensor.debug.CommDebugMode` because that mode counts calls per op without
their groups or bytes. Bytes per call are defined as in `moetrain.plan_comm`: the output of an
all-gather, the input of a reduce-scatter, an all-reduce's buffer, an all-to-all's send buffer,
a send's or a recv's message. Waits and autograd wrappers are not collectives.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

# c10d op (overload packet name) -> (recorded op, index of the tensor whose bytes count)
_C10D = {
    "_allgather_base_": ("all_gather", 0),  # (output, input, group, ...)
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input, group, ...)
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "alltoall_base_": ("all_to_all", 1),  # (output, input, group, ...)
    "send": ("send", 0),
    "recv_": ("recv", 0),
    "broadcast_": ("broadcast", 0),
}
_FUNCTIONAL = {
    "all_gather_into_tensor": "all_gather",  # (input, group_size, group_name): output = n x input
    "reduce_scatter_tensor": "reduce_scatter",  # (input, reduce_op, group_size, group_name)
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_to_all_single": "all_to_all",  # (input, output_splits, input_splits, group_name)
    "broadcast": "broadcast",
}


@dataclass(frozen=True)
class RecordedCall:
    op: str
    ranks: tuple[int, ...]
    bytes: int


def _nbytes(x: Any) -> int:
    tensors = [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _group_ranks(args: Any) -> tuple[int, ...]:
    for a in pytree.tree_leaves(args):
        if isinstance(a, str):
            try:
                group = dist.distributed_c10d._resolve_process_group(a)
            except Exception:  # a string that names no group (e.g. a reduce op)
                continue
            return tuple(dist.get_process_group_ranks(group))
        if isinstance(a, torch.ScriptObject):
            try:
                group = dist.ProcessGroup.unbox(a)
            except Exception:  # another script object (a ReduceOp)
                continue
            return tuple(dist.get_process_group_ranks(group))
    return ()


class CollectiveRecorder(TorchDispatchMode):
    """Records the collectives issued while active (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[RecordedCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func.namespace, func.overloadpacket.__name__
        if ns == "c10d" and name in _C10D:
            op, index = _C10D[name]
            self.calls.append(RecordedCall(op, _group_ranks(args), _nbytes(args[index])))
        elif ns == "_dtensor" and name == "shard_dim_alltoall":  # (input, gather, shard, group)
            # DTensor's shard-to-shard redistribution off CPU (on CPU: an all-gather and a chunk)
            self.calls.append(RecordedCall("all_to_all", _group_ranks(args), _nbytes(args[0])))
        elif ns == "_c10d_functional" and name in _FUNCTIONAL:
            op = _FUNCTIONAL[name]
            nbytes = _nbytes(args[0]) * (int(args[1]) if op == "all_gather" else 1)
            self.calls.append(RecordedCall(op, _group_ranks(args), nbytes))
        return func(*args, **kwargs)

    def totals(self) -> dict[tuple[str, tuple[int, ...]], tuple[int, int]]:
        """{(op, group ranks): (calls, bytes)} over everything recorded."""
        out: dict[tuple[str, tuple[int, ...]], list[int]] = defaultdict(lambda: [0, 0])
        for c in self.calls:
            agg = out[(c.op, c.ranks)]
            agg[0] += 1
            agg[1] += c.bytes
        return {key: (n, b) for key, (n, b) in out.items()}


__all__ = ["CollectiveRecorder", "RecordedCall"]
