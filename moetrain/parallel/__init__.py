"""Parallelism applied to the plain model by functions over device meshes (DESIGN.md §2)."""

from moetrain.parallel.context import ParallelContext, build_parallel_context
from moetrain.parallel.dims import LayoutError, ParallelDims, validate_layout

__all__ = ["LayoutError", "ParallelContext", "ParallelDims", "build_parallel_context", "validate_layout"]
