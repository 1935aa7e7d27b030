"""The step's one reduction: named tensors packed into one float64 vector, summed over every rank
by one all-reduce and read by the host once (docs/host_syncs.md).

    packed = Packed({"lm_sum": t0, "stop": t1, "moe": rows_LC})
    summed = packed.unpack(all_reduce(packed.flat))     # {"lm_sum": ..., "moe": [L, C]}

Values are packed and unpacked by name, in the order given, each keeping its shape; integers up
to 2**53 stay exact in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class Packed:
    """`named` tensors (any shapes, any dtypes) as one flat float64 vector on `device`."""

    def __init__(self, named: dict[str, torch.Tensor], device: torch.device) -> None:
        self.shapes = {name: tuple(t.shape) for name, t in named.items()}
        parts = [t.reshape(-1).to(device, torch.float64) for t in named.values()]
        self.flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64,
                                                                device=device)

    def slices(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """Where each named value sits in `flat`, and its shape."""
        out, offset = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = (slice(offset, offset + n), shape)
            offset += n
        return out

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values of a vector laid out like `self.flat`, by name, in their shapes."""
        return {name: flat[where].view(shape) for name, (where, shape) in self.slices().items()}


@dataclass(frozen=True)
class StepSums:
    """A step's named sums over every rank: `device[name]` stays on the device (for updates that
    must not wait for the host); `values(name)` / `item(name)` / `host(name)` are the same sums
    read by the host once, as Python floats or a CPU float64 tensor of the value's shape."""

    device: dict[str, torch.Tensor]
    packed: Packed
    host_values: list[float]  # the one host read of the summed vector

    def values(self, name: str) -> list[float]:
        return self.host_values[self.packed.slices()[name][0]]

    def item(self, name: str) -> float:
        (value,) = self.values(name)
        return value

    def maximum(self, name: str) -> float:
        """The largest element of a sum (of a per-rank vector: the largest rank's value)."""
        return max(self.values(name))

    def rank_maximum(self, name: str) -> torch.Tensor:
        """A per-rank value's element-wise maximum over the ranks ([world_size, *shape] slots
        -> [*shape]), on the device: for updates that must not wait for the host."""
        return self.device[name].amax(0)

    def host(self, name: str) -> torch.Tensor:
        return torch.tensor(self.values(name), dtype=torch.float64).view(
            self.packed.shapes[name])

    @property
    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient, before clipping."""
        return math.sqrt(max(self.item("grad_sq"), 0.0))


__all__ = ["Packed", "StepSums"]
