"""Configuration: the typed schema, its registration with Hydra, composition and validation."""

from moetrain.config.compose import CONFIG_DIR, compose, register_configs, to_object
from moetrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LBLConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    MoetrainConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    SparsitySchedule,
    TrainConfig,
    ValueSchedule,
)
from moetrain.config.validate import ConfigError, validate

__all__ = [
    "CONFIG_DIR",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LBLConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "MoetrainConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SparsitySchedule",
    "TrainConfig",
    "ValueSchedule",
    "compose",
    "register_configs",
    "to_object",
    "validate",
]
