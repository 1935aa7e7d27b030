"""Sharded checkpoints (torch.distributed.checkpoint) with an atomic `latest` pointer."""

from moetrain.checkpoint.manager import CheckpointError, CheckpointManager, TrainState

__all__ = ["CheckpointError", "CheckpointManager", "TrainState"]
