"""Metrics: JSONL files, console progress, wandb / TensorBoard, routing statistics."""

from moetrain.metrics.routing import RoutingAccumulator
from moetrain.metrics.sinks import MetricsLogger

__all__ = ["MetricsLogger", "RoutingAccumulator"]
