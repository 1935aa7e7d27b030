"""Parallelism applied to the plain model by functions over device meshes (docs/parallelism.md).

Torch-free here: the layout arithmetic (`ParallelDims`) and the config checks (`check_layout`).
The trainer's entry is `moetrain.parallel.parallelize.parallelize`, which returns the model and
its step runner (`moetrain.parallel.step`).
"""

from moetrain.parallel.checks import check_layout
from moetrain.parallel.dims import LayoutError, ParallelDims

__all__ = ["LayoutError", "ParallelDims", "check_layout"]
