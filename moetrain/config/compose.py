"""Register the schema with Hydra and compose configs outside `@hydra.main` (tests, tools)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moetrain.config.schema import MoetrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
SCHEMA_NAME = "moetrain_schema"


def register_configs() -> None:
    """Make the dataclass schema the base of `configs/config.yaml` and add our resolvers."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=MoetrainConfig)
    if not OmegaConf.has_resolver("moetrain_root"):
        # Lets shipped defaults (the tiny corpus) point into the checkout wherever it lives.
        OmegaConf.register_new_resolver("moetrain_root", lambda: str(REPO_ROOT))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config tree like the command line does, with Hydra's Compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    return cfg


def to_object(cfg: DictConfig) -> MoetrainConfig:
    """Resolve interpolations and turn the DictConfig into the typed dataclass tree."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
