"""Register the schema with Hydra, compose configs outside `@hydra.main` (tools, tests), and refuse
keys the schema does not have however they were written.

Hydra refuses an unknown key written `key=value` or in a YAML group (exit 1, several lines), but
accepts one added with `+key=value` or `++key=value`: OmegaConf then carries it on the
dataclass instance, where nothing reads it. `compose` turns Hydra's errors into one-line
`ConfigError`s naming the key, and `to_object` refuses any key outside the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moetrain.config.schema import MoetrainConfig
from moetrain.config.validate import ConfigError

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
    """Compose the config tree like the command line does, with Hydra's Compose API.

    Raises ConfigError (one line, naming the key) for an unknown key, a value of the wrong type,
    a missing config group option or an override Hydra cannot parse.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(composition_error(err)) from None


def to_object(cfg: DictConfig) -> MoetrainConfig:
    """Resolve interpolations and turn the DictConfig into the typed dataclass tree.

    Raises ConfigError naming the first key the schema does not have (e.g. `+train.max_step=5`),
    an interpolation that does not resolve, or a missing value (`???`).
    """
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    check_known_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(composition_error(err)) from None


def check_known_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key of `cfg` that `MoetrainConfig` does not define."""
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    _check_keys(tree, MoetrainConfig, "")


def _check_keys(tree: Any, schema: type, prefix: str) -> None:
    if not isinstance(tree, dict):
        return
    hints = typing.get_type_hints(schema)
    for key, value in tree.items():
        if prefix == "" and key == "hydra":  # Hydra's own node, present under @hydra.main
            continue
        if key not in hints:
            raise ConfigError(unknown_key_message(prefix + str(key), schema))
        sub = _dataclass_of(hints[key])
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (also through Optional[...]), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _schema_at(path: str) -> type | None:
    """The dataclass of the section `path` ("" = the root, "model.moe", ...), None if not one."""
    schema: type | None = MoetrainConfig
    for part in filter(None, path.split(".")):
        hints = typing.get_type_hints(schema) if schema is not None else {}
        schema = _dataclass_of(hints[part]) if part in hints else None
    return schema


def unknown_key_message(full_key: str, schema: type | None = None, where: str = "") -> str:
    """'unknown key ...' with the closest valid key and the keys valid at that level."""
    section, _, name = full_key.rpartition(".")
    schema = schema or _schema_at(section)
    if schema is None:  # a key below something that is not a section, e.g. train.max_steps.x
        return f"unknown key {full_key!r}{where}: {section} is a value, not a section"
    valid = [f.name for f in dataclasses.fields(schema)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
    scope = f"keys of {section}" if section else "top-level keys"
    return f"unknown key {full_key!r}{where}{hint}; valid {scope}: {', '.join(valid)}"


def _located_key(cause: Any) -> tuple[str, type | None]:
    """The full key of an unknown key and the section's dataclass: OmegaConf names a key inside
    a list element (a source of data.sources) without its path, so the section is found from
    the dataclass the key is missing from."""
    key, schema = str(cause.full_key), getattr(cause, "object_type", None)
    section = key.rpartition(".")[0]
    if not dataclasses.is_dataclass(schema) or _schema_at(section) is schema:
        return key, None
    path = _path_of(schema, MoetrainConfig, "")
    return (f"{path}.{key.rpartition('.')[2]}", schema) if path else (key, None)


def _path_of(target: type, schema: type, prefix: str) -> str | None:
    """Where the section `target` sits in the config tree ("data.tokenizer", or
    "data.sources[]" for an element of a list of sections); None if nowhere."""
    for name, hint in typing.get_type_hints(schema).items():
        sub, path = _list_element(hint), prefix + name + "[]"
        if sub is None:
            sub, path = _dataclass_of(hint), prefix + name
        if sub is target:
            return path
        found = _path_of(target, sub, path + ".") if sub is not None else None
        if found:
            return found
    return None


def _list_element(hint: Any) -> type | None:
    """The dataclass of a List[...] field's elements (also through Optional), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is list:
            return _dataclass_of(typing.get_args(candidate)[0])
    return None


def composition_error(err: BaseException) -> str:
    """One line for an error Hydra raised while composing, naming the key where it can."""
    head = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    # "In 'experiment/foo': ..." names the YAML file a bad key came from.
    source = head[4:head.index("'", 4)] if head.startswith("In '") else None
    where = f" in {source}.yaml" if source and source != "config" else ""
    cause = _omegaconf_cause(err)
    if cause is not None and cause.full_key:
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in" in str(cause):
            return unknown_key_message(*_located_key(cause), where=where)
        reason = str(cause).strip().splitlines()[0]
        return f"{cause.full_key}{where}: {reason}"
    # Missing group options, unparsable overrides, '+' on an existing key: Hydra's own words,
    # without the config search path it appends.
    text = str(err).split("Config search path:")[0]
    return " ".join(text.replace("\t", " ").split())


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    """The first OmegaConf error with a `full_key` in the chain of causes."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return err
        err = err.__cause__ or err.__context__
    return None
