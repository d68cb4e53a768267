"""Reading a YAML mapping from a user's file, with one-line errors (presets and --config files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crappify.errors import ConfigError


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file (empty file → {}); `what` names the file in errors ("config file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of key: value")
    return data
