"""Configuration: typed defaults in code, then a YAML file, then command-line flags — validated once.

Each command has a pydantic model with `extra="forbid"`, so an unknown key in a YAML file or a bad
value is an error that names the key, shown to the user as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from crappify.errors import ConfigError, brief
from crappify.yamlfile import read_mapping

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file's options (`hr-format` and `hr_format` both accepted)."""
    return {str(k).replace("-", "_"): v for k, v in read_mapping(path, "config file").items()}


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line for a pydantic error: the first problem, with the valid keys when a key is unknown."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(model.model_fields))
        return f"unknown option {where!r}; valid: {valid}"
    msg = err["msg"].removeprefix("Value error, ")  # a validator's own message says what is wrong already
    if not err["loc"]:  # a check across several options (a model validator): its message names them
        return msg
    if err["type"] == "missing":
        return f"option {where!r} is required"
    return f"option {where!r}: {msg} (got {brief(err.get('input'))})"


def non_default(cfg: BaseModel, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """`cfg`'s JSON dump less the keys in `skip` and the options left at their defaults: what identifies it in a
    hash, so that an option added later, with a default that keeps the old behaviour, changes no existing hash."""
    import json

    defaults = {k: json.loads(json.dumps(f.get_default(call_default_factory=True), default=str))
                for k, f in type(cfg).model_fields.items() if not f.is_required()}
    return {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in skip and not (k in defaults and defaults[k] == v)}


def resolve(model: type[M], config_file: str | Path | None = None, **flags: Any) -> M:
    """Defaults ← YAML file ← flags (flags given as None are treated as not given)."""
    data: dict[str, Any] = read_yaml(config_file) if config_file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, model)) from None
