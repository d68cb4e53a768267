"""Reading YAML from a user's file, with one-line errors and bounded work (presets, configs, pipelines,
a dataset's config.yaml).

YAML's anchors and aliases let a few hundred bytes describe a value of billions of nodes (a "billion laughs"
document): PyYAML shares the aliased objects, so loading stays small, but anything that later walks or formats
the value (a validation message, a hash of the config) expands it. `safe_load` here counts every node as
expanded and refuses a document past `MAX_NODES`, which no real config comes near.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crappify.errors import ConfigError

MAX_NODES = 100_000  # the largest shipped pipeline has under 500


class TooLarge(yaml.YAMLError):
    """A document whose nodes, aliases expanded, exceed `MAX_NODES`."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting each node's size with its aliases expanded as the document is composed
    (bottom-up, so each size is the sum of its children's, already known: linear in the document's text)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        node = super().compose_node(parent, index)
        key = id(node)
        if key not in self._sizes:  # an alias returns a node already counted
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            else:
                size = 1
            if size > MAX_NODES:
                raise TooLarge(f"it expands to more than {MAX_NODES} values (aliases of aliases?)")
            self._sizes[key] = size
        return node


def safe_load(text: str) -> Any:
    """`yaml.safe_load` with the size bound above (`TooLarge`, a `yaml.YAMLError`, past it)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file (empty file → {}); `what` names the file in errors ("config file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of key: value")
    return data
