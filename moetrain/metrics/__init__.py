"""Metrics: JSONL files, console progress, wandb / TensorBoard, routing statistics."""

from moetrain.metrics.routing import summarize_routing
from moetrain.metrics.sinks import MetricsLogger

__all__ = ["MetricsLogger", "summarize_routing"]
