"""Small explicit registries: one dict per kind of thing, filled by a `register` decorator.

A registry also holds each entry's options and their defaults — the one way ops, generators, critics and losses
declare them: `register(name, options={...})`, or, without `options`, the keyword-only parameters (with their
defaults) of the registered callable, less the registry's `reserved` arguments (those its caller passes itself,
e.g. a loss's `pretrained`). `resolve_options` checks given options against them (an unknown one is a
ConfigError listing the valid ones) and fills in the defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

from crappify.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind; duplicate or unknown names raise with the valid names listed."""

    def __init__(self, kind: str, reserved: Iterable[str] = (), option_word: str = "option") -> None:
        self.kind = kind
        self.reserved = frozenset(reserved)
        self.option_word = option_word  # what the entries' options are called in messages ("parameter" for ops)
        self._items: dict[str, T] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def register(self, name: str, options: Mapping[str, Any] | None = None) -> Callable[[T], T]:
        """Decorator that adds its target under `name`, with its options' defaults (see the module docstring)."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}; already registered: {self.names()}")
            self._items[name] = obj
            self._options[name] = dict(options) if options is not None else self._signature_options(obj)
            return obj

        return add

    def _signature_options(self, obj: object) -> dict[str, Any]:
        if not callable(obj):
            return {}
        params = inspect.signature(obj).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in self.reserved}

    def options(self, name: str) -> dict[str, Any]:
        """Entry `name`'s options and their defaults, in declaration order (a copy)."""
        self.get(name)
        return dict(self._options[name])

    def resolve_options(self, name: str, given: Mapping[str, Any],
                        defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`given` with entry `name`'s defaults filled in; an unknown option is a ConfigError listing the valid
        ones. `defaults` stands in for the registered ones (an entry built on the fly, e.g. a timm U-Net)."""
        defaults = self.options(name) if defaults is None else dict(defaults)
        unknown = [k for k in given if k not in defaults]
        if unknown:
            raise ConfigError(f"unknown {self.option_word}(s) {', '.join(map(str, unknown))} for {self.kind} "
                              f"{name!r}; valid: {', '.join(sorted(defaults)) or '(none)'}")
        return {**defaults, **given}

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def name_type(self, *extra: str) -> Any:
        """A config field type for one of this registry's names (or one of `extra`, e.g. "auto"): checked against
        the registry when the config is read, so the valid names are written once, where they are registered."""

        def check(name: str) -> str:
            if name not in extra and name not in self._items:
                raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join([*extra, *self.names()])}")
            return name

        return Annotated[str, AfterValidator(check)]
