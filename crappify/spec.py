"""Parameter specs: how a preset writes a value that may be fixed, sampled, or shared.

In a preset, an op parameter is one of
- a plain value (`quality: 50`) — fixed;
- a two-element numeric list (`quality: [10, 70]`) — uniform in the closed range (integers for int
  parameters);
- a list of strings or `{choice: [...]}` — one of them, uniformly;
- `$name` — the value of the preset-level variable `name`, drawn once per image, so two ops can share
  it (lesson 7 writes the JPEG quality it then uses).
Specs draw only from the `numpy.random.Generator` they are handed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from crappify.errors import ConfigError, brief

KINDS = ("int", "float", "str", "bool", "color")


@dataclass(frozen=True)
class Param:
    """Declaration of one op parameter: its kind, default and allowed values."""

    kind: str
    default: Any
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # a typo in an op's declaration, caught when the op module loads
            raise ValueError(f"parameter kind must be one of {', '.join(KINDS)}, not {self.kind!r}")


class Spec:
    """A parsed parameter value; `draw` turns it into a concrete value for one image."""

    __slots__ = ("mode", "param", "raw", "value", "where")

    def __init__(self, where: str, param: Param, raw: Any) -> None:
        self.where, self.param, self.raw = where, param, raw
        self.mode, self.value = self._parse(raw)

    def _fail(self, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {why} (got {brief(self.raw)})")

    def _parse(self, raw: Any) -> tuple[str, Any]:
        p = self.param
        if raw is None:
            if p.nullable:
                return "fixed", None
            raise self._fail("a value is required")
        if isinstance(raw, str) and raw.startswith("$"):
            if not raw[1:].isidentifier():
                raise self._fail("a variable reference must look like $name")
            return "var", raw[1:]
        if isinstance(raw, dict):
            if set(raw) != {"choice"} or not isinstance(raw["choice"], list) or not raw["choice"]:
                raise self._fail("a mapping must be {choice: [values...]}")
            return "choice", [self._scalar(v) for v in raw["choice"]]
        if isinstance(raw, (list, tuple)) and p.kind != "color":
            if p.kind in ("int", "float") and len(raw) == 2 and all(_is_number(v) for v in raw):
                lo, hi = (self._scalar(v) for v in raw)
                if lo > hi:
                    raise self._fail("range must be [low, high] with low <= high")
                return "range", (lo, hi)
            if p.kind == "str" and raw:
                return "choice", [self._scalar(v) for v in raw]
            raise self._fail("a list must be a [low, high] range for numbers or a list of choices for names")
        return "fixed", self._scalar(raw)

    def _scalar(self, v: Any) -> Any:
        p = self.param
        if p.kind == "bool":
            if not isinstance(v, bool):
                raise self._fail("expected true or false")
            return v
        if p.kind == "color":
            if (not isinstance(v, (list, tuple)) or len(v) != 3
                    or not all(isinstance(c, int) and 0 <= c <= 255 for c in v)):
                raise self._fail("expected a colour [r, g, b] with 0-255 integers")
            return [int(c) for c in v]  # a fresh list, so records never share it
        if p.kind == "str":
            if not isinstance(v, str):
                raise self._fail("expected a name")
            if p.choices is not None and v not in p.choices:
                raise self._fail(f"expected one of {', '.join(p.choices)}")
            return v
        if not _is_number(v) or not math.isfinite(v) or (p.kind == "int" and not float(v).is_integer()):
            raise self._fail(f"expected {'an integer' if p.kind == 'int' else 'a number'}")
        v = int(v) if p.kind == "int" else float(v)
        if (p.lo is not None and v < p.lo) or (p.hi is not None and v > p.hi):
            raise self._fail(f"must lie in [{p.lo}, {p.hi}]")
        return v

    def values(self) -> list[Any]:
        """The values this spec can produce, for range specs its two ends (used to check $var uses)."""
        if self.mode == "range":
            return list(self.value)
        if self.mode == "choice":
            return list(self.value)
        return [self.value]

    def check(self, value: Any) -> None:
        """Raise ConfigError unless `value` is acceptable for this parameter."""
        self._scalar(str(value) if self.param.kind == "str" else value)

    @property
    def var(self) -> str | None:
        """Name of the variable this spec refers to, if any."""
        return self.value if self.mode == "var" else None

    def draw(self, rng: np.random.Generator, variables: dict[str, Any]) -> Any:
        """A concrete value for one image (plain Python types, so it serialises to JSON exactly)."""
        if self.mode == "fixed":
            return list(self.value) if isinstance(self.value, list) else self.value
        if self.mode == "var":
            value = variables[self.value]
            return self._scalar(str(value) if self.param.kind == "str" else value)
        if self.mode == "choice":
            return self.value[int(rng.integers(len(self.value)))]
        lo, hi = self.value
        if self.param.kind == "int":
            return int(rng.integers(lo, hi + 1))
        return float(rng.uniform(lo, hi))


def variable_spec(name: str, raw: Any) -> Spec:
    """Spec for a preset-level variable; its kind follows the values written."""
    values = raw.get("choice", raw) if isinstance(raw, dict) else raw
    flat = values if isinstance(values, (list, tuple)) else [values]
    if all(isinstance(v, bool) for v in flat):
        kind = "bool"
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        kind = "int"
    elif all(_is_number(v) for v in flat):
        kind = "float"
    else:
        kind = "str"
    spec = Spec(f"vars.{name}", Param(kind, None), raw)
    if spec.mode == "var":
        raise ConfigError(f"vars.{name}: a variable cannot refer to another variable")
    return spec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
