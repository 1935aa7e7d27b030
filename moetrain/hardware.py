"""The GPUs the planner knows: peak dense bf16 throughput, memory and link bandwidths.

    gpu = hardware("h100")              # a Hardware, or HardwareError naming the valid names
    gpu = hardware("h100", memory_gib=75, gpus_per_node=4)   # --gpu-memory, --gpus-per-node

Datasheet values (sources in docs/planning.md, "Hardware"): dense (no 2:4 sparsity) bf16 tensor
throughput, HBM capacity and bandwidth, NVLink bandwidth per GPU and direction (half the
datasheet's bidirectional figure), the GPUs that share one NVLink domain ("a node": 8 on HGX /
DGX boards, 72 in a GB200 NVL72 rack), and the scale-out network per GPU and direction (one
400 Gb/s ConnectX-7 / InfiniBand NDR port per GPU on every system listed). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


class HardwareError(ValueError):
    """An unknown GPU or an impossible override; the message is one line naming the flag."""


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16 tensor-core TFLOP/s per GPU
    memory_gib: float  # HBM per GPU, GiB (the datasheet's "80 GB" are 5 stacks of 16 GiB)
    hbm_tb_s: float  # HBM bandwidth, TB/s
    nvlink_gb_s: float  # NVLink, GB/s per GPU and direction
    gpus_per_node: int  # GPUs of one NVLink domain
    network_gb_s: float  # scale-out network, GB/s per GPU and direction

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


#: name -> Hardware (docs/planning.md names each value's source).
GPUS: dict[str, Hardware] = {
    "h100": Hardware("h100", peak_tflops=989.0, memory_gib=80.0, hbm_tb_s=3.35,
                     nvlink_gb_s=450.0, gpus_per_node=8, network_gb_s=50.0),
    "h200": Hardware("h200", peak_tflops=989.0, memory_gib=141.0, hbm_tb_s=4.8,
                     nvlink_gb_s=450.0, gpus_per_node=8, network_gb_s=50.0),
    "b200": Hardware("b200", peak_tflops=2250.0, memory_gib=180.0, hbm_tb_s=8.0,
                     nvlink_gb_s=900.0, gpus_per_node=8, network_gb_s=50.0),
    "gb200": Hardware("gb200", peak_tflops=2500.0, memory_gib=186.0, hbm_tb_s=8.0,
                      nvlink_gb_s=900.0, gpus_per_node=72, network_gb_s=50.0),
}


def hardware(name: str, memory_gib: Optional[float] = None,
             gpus_per_node: Optional[int] = None) -> Hardware:
    """The named GPU, with `memory_gib` / `gpus_per_node` replacing the table's values.

    Raises HardwareError (one line naming --gpu, --gpu-memory or --gpus-per-node)."""
    gpu = GPUS.get(str(name).lower())
    if gpu is None:
        raise HardwareError(f"--gpu {name!r} is not known; valid: {', '.join(GPUS)}")
    if memory_gib is not None:
        if not memory_gib > 0:
            raise HardwareError(f"--gpu-memory must be a positive number of GiB, got {memory_gib}")
        gpu = replace(gpu, memory_gib=float(memory_gib))
    if gpus_per_node is not None:
        check_gpus_per_node(gpus_per_node)
        gpu = replace(gpu, gpus_per_node=int(gpus_per_node))
    return gpu


def check_gpus_per_node(gpus_per_node: int) -> None:
    if not (isinstance(gpus_per_node, int) and gpus_per_node >= 1):
        raise HardwareError(f"--gpus-per-node must be a positive integer, got {gpus_per_node!r}")


__all__ = ["GPUS", "Hardware", "HardwareError", "check_gpus_per_node", "hardware"]
