"""Chains of ops (presets): build from YAML, run on an image with a seeded generator, replay a record.

A preset is a mapping:

    name: lesson7
    description: one line
    scale: null          # an integer fixes the dataset's HR/LR ratio; null takes --scale
    shrink_on_decode: true  # optional, see below
    vars: {q: [10, 70]}  # drawn once per image, referenced from op parameters as $q
    steps:               # applied in order; each has an op name, an optional probability p, and params
      - {op: resize, size: 96, interpolation: bilinear}
      - {op: text, text: $q}
      - {op: jpeg, quality: $q}

The `repeat` op runs a nested list of steps several times ("second-order" degradation);
`random_order` runs its nested steps (or lists of steps, kept together) once each in a drawn order.

`shrink_on_decode: true` trades exactness for speed, for presets whose first step is a fixed resize:
when the builder keeps the HR byte-for-byte, it decodes a JPEG at 1/2, 1/4 or 1/8 size (libjpeg's DCT
scaling, still at least the resize's target) and runs the chain on that. The LR is then not exactly the
chain applied to the HR's full pixels; the manifest's params record the reduction as `reduced`, and
replaying on the HR decoded with `reduce=` that value gives the LR exactly. Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from crappify import functional as F
from crappify.errors import ConfigError
from crappify.ops import OPS, Context, Op, Resize, Visit, register
from crappify.registry import Registry
from crappify.spec import Param, Spec, variable_spec
from crappify.yamlfile import read_mapping

PRESET_DIR = Path(__file__).with_name("presets")
PRESETS: Registry[Path] = Registry("preset")
for _path in sorted(PRESET_DIR.glob("*.yaml")):
    PRESETS.register(_path.stem)(_path)

_PRESET_KEYS = {"name", "description", "scale", "shrink_on_decode", "vars", "steps"}
Trace = list[tuple[str, np.ndarray]]


@dataclass
class OpStep:
    """One step of a chain: an op and the probability `p` that it runs on an image."""

    op: Op
    p: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op.name}
        if self.p != 1.0:
            out["p"] = self.p
        out.update(self.op.to_dict())
        return out


@dataclass
class Degraded:
    """Result of running a chain on one image."""

    image: np.ndarray | None  # None only when decoding the final JPEG was not asked for
    encoded: bytes | None  # the JPEG bytes when the last applied op was `jpeg`
    record: dict[str, Any]  # {"vars": {...}, "steps": [...]} — replays to the same output
    size: tuple[int, int]  # (width, height) of the output, known even when it was not decoded


def build_steps(raw_steps: Any, where: str = "steps") -> list[OpStep]:
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{where}: expected a non-empty list of {{op: name, ...}} mappings")
    steps = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict) or "op" not in raw:
            raise ConfigError(f"{where}[{i}]: expected a mapping with an 'op' key, got {raw!r}")
        params = dict(raw)
        name = params.pop("op")
        p = params.pop("p", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"{where}[{i}] ({name}): p must be a probability in [0, 1], got {p!r}")
        steps.append(OpStep(OPS.get(name)(**params), float(p)))
    return steps


def _label(name: str, params: dict[str, Any] | None) -> str:
    if params is None:
        return f"{name} (skipped)"
    shown = {k: v for k, v in params.items() if k not in ("seed", "rects", "rounds", "color")}
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    return " ".join([name, *parts])


def run_steps(steps: list[OpStep], img: np.ndarray, rng: np.random.Generator, ctx: Context,
              trace: Trace | None = None) -> tuple[np.ndarray | None, bytes | None, list[dict[str, Any]]]:
    """Run steps in order; JPEG bytes stay undecoded until a later op (or the caller) needs pixels.

    `ctx.size` follows the current image's (width, height), so it is known when pixels are not.
    """
    image: np.ndarray | None = img
    encoded: bytes | None = None
    records: list[dict[str, Any]] = []
    for step in steps:
        name = step.op.name
        if step.p < 1.0 and rng.random() >= step.p:
            records.append({"op": name, "applied": False})
            if trace is not None:
                image = image if image is not None else F.jpeg_decode(encoded)
                trace.append((_label(name, None), image))
            continue
        if image is None:
            image = F.jpeg_decode(encoded)
        ctx.size = (image.shape[1], image.shape[0])
        image, encoded, params = step.op.forward(image, rng, ctx)
        if image is not None:
            ctx.size = (image.shape[1], image.shape[0])
        records.append({"op": name, **params})
        if trace is not None:
            image = image if image is not None else F.jpeg_decode(encoded)
            trace.append((_label(name, params), image))
    return image, encoded, records


def replay_steps(steps: list[OpStep], img: np.ndarray,
                 records: list[dict[str, Any]]) -> tuple[np.ndarray | None, bytes | None]:
    """Re-apply recorded parameters; gives exactly what `run_steps` gave."""
    if [r.get("op") for r in records] != [s.op.name for s in steps]:
        raise ConfigError("the record does not match this preset's steps")
    image: np.ndarray | None = img
    encoded: bytes | None = None
    for step, rec in zip(steps, records, strict=True):
        if rec.get("applied") is False:
            continue
        if image is None:
            image = F.jpeg_decode(encoded)
        image, encoded = step.op.replay(image, {k: v for k, v in rec.items() if k != "op"})
    return image, encoded


def follow_record(records: Any, size: tuple[int, int] | None,
                  visit: Visit | None = None) -> tuple[int, int] | None:
    """Follow the recorded steps of a chain's run (the `steps` of `run`'s record, a manifest row's params) from
    an input of `size` (width, height) without running them: each applied step, nested ones included, is handed
    to `visit` with the size of the image it ran on, and the size after the steps is returned. What each step
    does to the size is its op's to say (`Op.keeps_size`, `Op.size_after`); from the first step whose effect is
    unknown (an op not registered) the size is None. A record not of `run`'s shape raises ValueError, KeyError
    or TypeError."""
    if not isinstance(records, list):
        raise ValueError("steps is not a list")
    for rec in records:
        if not isinstance(rec, dict):
            raise ValueError("a step is not a mapping")
        if rec.get("applied") is False:
            continue
        if visit is not None:
            visit(rec, size)
        name = rec.get("op")
        size = OPS.get(name).size_after(size, rec, visit) if isinstance(name, str) and name in OPS else None
    return size


@register("repeat")
class Repeat(Op):
    """Run nested `steps` `times` times in a row: the way to write a second-order degradation."""

    name = "repeat"
    params = {"times": Param("int", 2, lo=1, hi=10)}

    def __init__(self, steps: Any = None, **raw: Any) -> None:
        super().__init__(**raw)
        self.steps = build_steps(steps, "repeat.steps")

    @property
    def keeps_size(self) -> bool:  # its nested steps decide
        return all(s.op.keeps_size for s in self.steps)

    @classmethod
    def size_after(cls, size, params, visit=None):
        for records in params["rounds"]:
            size = follow_record(records, size, visit)
        return size

    def variables(self) -> set[str]:
        return super().variables().union(*(s.op.variables() for s in self.steps))

    def to_dict(self) -> dict[str, Any]:
        return {**self.raw, "steps": [s.to_dict() for s in self.steps]}

    def forward(self, img, rng, ctx):
        rounds = []
        image, encoded = img, None
        for _ in range(self.draw("times", rng, ctx)):
            if image is None:
                image = F.jpeg_decode(encoded)
            image, encoded, records = run_steps(self.steps, image, rng, ctx)
            rounds.append(records)
        return image, encoded, {"rounds": rounds}

    def replay(self, img, params):
        image, encoded = img, None
        for records in params["rounds"]:
            if image is None:
                image = F.jpeg_decode(encoded)
            image, encoded = replay_steps(self.steps, image, records)
        return image, encoded

    def apply(self, img, rounds):
        image, encoded = self.replay(img, {"rounds": rounds})
        return image if image is not None else F.jpeg_decode(encoded)


@register("random_order")
class RandomOrder(Op):
    """Run each item of `steps` once, in an order drawn per image (Real-ESRGAN's last stage).

    An item may be a list of steps kept together: Real-ESRGAN writes [resize + sinc] and JPEG, either first.
    The record holds the order and each item's records, so `replay` needs no random draws.
    """

    name = "random_order"
    params = {}

    def __init__(self, steps: Any = None, **raw: Any) -> None:
        super().__init__(**raw)
        if not isinstance(steps, list) or not steps:
            raise ConfigError("random_order.steps: expected a non-empty list of steps or lists of steps")
        self.groups = [build_steps(g if isinstance(g, list) else [g], f"random_order.steps[{i}]")
                       for i, g in enumerate(steps)]
        self.steps = [s for g in self.groups for s in g]  # flat, for variable checks and lookups

    @property
    def keeps_size(self) -> bool:  # its nested steps decide
        return all(s.op.keeps_size for s in self.steps)

    @classmethod
    def size_after(cls, size, params, visit=None):
        for records in params["rounds"]:  # in the order they ran
            size = follow_record(records, size, visit)
        return size

    def variables(self) -> set[str]:
        return super().variables().union(*(s.op.variables() for s in self.steps))

    def to_dict(self) -> dict[str, Any]:
        items = [[s.to_dict() for s in g] if len(g) > 1 else g[0].to_dict() for g in self.groups]
        return {**self.raw, "steps": items}

    def forward(self, img, rng, ctx):
        order = [int(i) for i in rng.permutation(len(self.groups))]
        rounds = []
        image, encoded = img, None
        for i in order:
            if image is None:
                image = F.jpeg_decode(encoded)
            image, encoded, records = run_steps(self.groups[i], image, rng, ctx)
            rounds.append(records)
        return image, encoded, {"order": order, "rounds": rounds}

    def replay(self, img, params):
        order, rounds = params.get("order"), params.get("rounds")
        if (not isinstance(order, list) or sorted(order) != list(range(len(self.groups)))
                or not isinstance(rounds, list) or len(rounds) != len(order)):
            raise ConfigError("the record does not match this preset's steps (random_order)")
        image, encoded = img, None
        for i, records in zip(order, rounds, strict=True):
            if image is None:
                image = F.jpeg_decode(encoded)
            image, encoded = replay_steps(self.groups[i], image, records)
        return image, encoded

    def apply(self, img, order, rounds):
        image, encoded = self.replay(img, {"order": order, "rounds": rounds})
        return image if image is not None else F.jpeg_decode(encoded)


def _all_ops(steps: list[OpStep]) -> list[Op]:
    """Every op in `steps`, nested `repeat` / `random_order` steps included."""
    out: list[Op] = []
    for s in steps:
        out.append(s.op)
        if isinstance(s.op, (Repeat, RandomOrder)):
            out += _all_ops(s.op.steps)
    return out


class Chain:
    """An ordered degradation pipeline (what a preset describes)."""

    def __init__(self, steps: list[OpStep], name: str = "custom", description: str = "",
                 scale: int | None = None, variables: dict[str, Spec] | None = None,
                 shrink_on_decode: bool = False) -> None:
        self.steps, self.name, self.description, self.scale = steps, name, description, scale
        self.shrink_on_decode = shrink_on_decode
        self.vars = variables or {}
        missing = sorted(set().union(*(s.op.variables() for s in steps)) - set(self.vars))
        if missing:
            raise ConfigError(f"preset {name!r}: undefined variable(s) {', '.join('$' + m for m in missing)}; "
                              "define them under vars:")
        for op in _all_ops(steps):
            op.check_variables(self.vars)

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "custom") -> Chain:
        if not isinstance(data, dict):
            raise ConfigError("a preset must be a mapping with a 'steps' list")
        unknown = sorted(set(data) - _PRESET_KEYS)
        if unknown:
            raise ConfigError(f"preset: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_PRESET_KEYS))}")
        scale = data.get("scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
            raise ConfigError(f"preset: scale must be a positive integer or null, got {scale!r}")
        shrink = data.get("shrink_on_decode", False)
        if not isinstance(shrink, bool):
            raise ConfigError(f"preset: shrink_on_decode must be true or false, got {shrink!r}")
        raw_vars = data.get("vars") or {}
        if not isinstance(raw_vars, dict):
            raise ConfigError("preset: vars must be a mapping of name: value/range/choices")
        return cls(build_steps(data.get("steps")), str(data.get("name", default_name)),
                   str(data.get("description", "")), scale,
                   {str(k): variable_spec(str(k), v) for k, v in raw_vars.items()}, shrink)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "scale": self.scale}
        if self.shrink_on_decode:
            out["shrink_on_decode"] = True
        if self.vars:
            out["vars"] = {k: s.raw for k, s in self.vars.items()}
        out["steps"] = [s.to_dict() for s in self.steps]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    @property
    def uses_lr_size(self) -> bool:
        """Whether some resize targets the dataset's LR size (so the dataset has an integer scale)."""
        return any(isinstance(op, Resize) and op.needs_lr_size for op in _all_ops(self.steps))

    def leading_size(self, width: int, height: int, lr_size: tuple[int, int] | None) -> tuple[int, int] | None:
        """Output size of the first step when it is a certain, non-random resize; else None.

        Lets the builder decode a JPEG at reduced size (DCT scaling) when the chain shrinks it anyway.
        """
        first = self.steps[0]
        if first.p < 1.0 or not isinstance(first.op, Resize):
            return None
        return first.op.target(width, height, None, Context(lr_size=lr_size))

    def run(self, img: np.ndarray, rng: np.random.Generator, lr_size: tuple[int, int] | None = None,
            decode: bool = True, trace: Trace | None = None) -> Degraded:
        """Degrade `img` (HWC uint8 RGB); every random choice comes from `rng` and lands in the record."""
        variables = {k: spec.draw(rng, {}) for k, spec in self.vars.items()}
        ctx = Context(variables, lr_size, (img.shape[1], img.shape[0]))
        image, encoded, records = run_steps(self.steps, img, rng, ctx, trace)
        if image is None and decode:
            image = F.jpeg_decode(encoded)
        return Degraded(image, encoded, {"vars": variables, "steps": records}, ctx.size)

    def replay(self, img: np.ndarray, record: dict[str, Any], decode: bool = True) -> Degraded:
        """Apply a record made by `run` again: the same pixels (and JPEG bytes) come out."""
        image, encoded = replay_steps(self.steps, img, record["steps"])
        if image is None:
            image = F.jpeg_decode(encoded)
        return Degraded(image if decode else None, encoded, record, (image.shape[1], image.shape[0]))


def load_preset(name_or_path: str | Path) -> Chain:
    """A built-in preset by name, or a user's YAML file."""
    text = str(name_or_path)
    path = Path(text)
    if text in PRESETS:
        path = PRESETS.get(text)
    elif not (path.suffix in (".yaml", ".yml") or path.exists()):
        PRESETS.get(text)  # raises with the valid names
    return Chain.from_dict(read_mapping(path, "preset file"), default_name=path.stem)
