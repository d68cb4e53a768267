"""Degradation ops: transforms that sample their parameters from a seeded generator and record them.

Each op is registered by name in `OPS`. An op is built from the parameters a preset writes
(validated against its `params` declaration), then for each image:
- `sample(img, rng, ctx)` draws concrete parameters (plain JSON-able values, including any seed the
  pixel maths needs), and
- `apply(img, **params)` runs the pure function from `crappify.functional` with them.
The recorded parameters alone reproduce the output (`replay`), which is what the manifest stores.
Each op also declares whether its output keeps its input's size (`keeps_size`; `register` refuses an op that
does not say), and tells from its record the size it produced (`size_after`): what lets a record be followed
without running it (`crappify.chain.follow_record`, through which evaluate maps occlusions to the HR).

Where each op comes from: `resize` — Pillow (antialiased shrinking) / OpenCV; `gaussian_blur` —
OpenCV (`GaussianBlur`, `filter2D` with a rotated kernel written here); `blur`, `sinc` — OpenCV
`filter2D` with Real-ESRGAN's kernels (generalized Gaussian, plateau, circular low-pass) written
here; `motion_blur` — albumentations' kernel + OpenCV; `noise` — written here (seeded Gaussian /
Poisson); `jpeg` — OpenCV codec; `occlude` — written here; `text` — OpenCV `putText`;
`color_jitter`, `desaturate` — albumentations' functions; `repeat`, `random_order` — chain
composition (see `crappify.chain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from crappify import functional as F
from crappify.errors import ConfigError, brief
from crappify.registry import Registry
from crappify.spec import Param, Spec

OPS: Registry[type[Op]] = Registry("op", option_word="parameter")
# What `crappify.chain.follow_record` calls for each applied step of a record: (the step's record, the
# (width, height) of the image it ran on, None when unknown).
Visit = Callable[[dict[str, Any], tuple[int, int] | None], None]


def register(name: str) -> Callable[[type[Op]], type[Op]]:
    """Class decorator: op `name`, its options being its `params` declarations' defaults. The op must declare
    `keeps_size` (a bool, or a property for an op whose nested steps decide): a TypeError otherwise."""

    def add(cls: type[Op]) -> type[Op]:
        if not isinstance(getattr(cls, "keeps_size", None), (bool, property)):
            raise TypeError(f"op {name!r} ({cls.__name__}) must declare `keeps_size = True` or `False`: whether "
                            "its output always has its input's width and height")
        return OPS.register(name, options={k: p.default for k, p in cls.params.items()})(cls)

    return add


@dataclass
class Context:
    """What an op may know about the item besides its input pixels."""

    variables: dict[str, Any] = field(default_factory=dict)
    lr_size: tuple[int, int] | None = None  # (width, height) the dataset's LR must have, when fixed
    size: tuple[int, int] = (0, 0)  # (width, height) of the image being processed


class Op:
    """Base class: validates preset parameters into `Spec`s; subclasses define `sample` and `apply`."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    # Whether the output always has the input's (width, height). Declared by every op, never defaulted: what
    # relies on it (an occlusion's rectangle mapped to the HR through the steps after it) must not guess.
    keeps_size: ClassVar[bool]

    def __init__(self, **raw: Any) -> None:
        values = OPS.resolve_options(self.name, raw, {k: p.default for k, p in self.params.items()})
        self.raw = dict(raw)
        self.specs = {k: Spec(f"op {self.name!r}, parameter {k!r}", p, values[k]) for k, p in self.params.items()}

    def draw(self, key: str, rng: np.random.Generator, ctx: Context) -> Any:
        return self.specs[key].draw(rng, ctx.variables)

    def variables(self) -> set[str]:
        """Names of preset variables this op refers to."""
        return {s.var for s in self.specs.values() if s.var}

    def check_variables(self, variables: dict[str, Spec]) -> None:
        """Raise ConfigError if a `$var` this op uses can take a value its parameter does not accept."""
        for spec in self.specs.values():
            if spec.var and spec.var in variables:
                for value in variables[spec.var].values():
                    spec.check(value)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as written (a preset's YAML form)."""
        return dict(self.raw)

    def sample(self, img: np.ndarray, rng: np.random.Generator, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        raise NotImplementedError

    def forward(self, img: np.ndarray, rng: np.random.Generator,
                ctx: Context) -> tuple[np.ndarray | None, bytes | None, dict[str, Any]]:
        """Sample and apply: returns (image, encoded bytes or None, recorded params).

        The image is None only when the op produced encoded bytes whose decoding was deferred.
        """
        params = self.sample(img, rng, ctx)
        return self.apply(img, **params), None, params

    def replay(self, img: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray | None, bytes | None]:
        """Apply recorded params again (same output as `forward` gave)."""
        return self.apply(img, **params), None

    @classmethod
    def size_after(cls, size: tuple[int, int] | None, params: dict[str, Any],
                   visit: Visit | None = None) -> tuple[int, int] | None:
        """The (width, height) this op's output had, from its input's `size` (None: unknown) and its recorded
        `params`, without running it: `size` for an op that keeps it, else None (unknown) unless the op says
        more (`resize` records its output size). `visit` is for ops with nested steps, which pass it on to
        `crappify.chain.follow_record`."""
        return size if cls.keeps_size is True else None


def _random_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**63 - 1))


def _weights(where: str, raw: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Parse `{name: weight, ...}` (or a list of names, equally likely) into normalised probabilities."""
    if isinstance(raw, list) and raw and all(isinstance(n, str) for n in raw):
        raw = dict.fromkeys(raw, 1.0)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: expected a mapping of name: weight with names from {', '.join(names)} "
                          f"(got {brief(raw)})")
    bad = sorted(str(k) for k in raw if k not in names)
    if bad:
        raise ConfigError(f"{where}: unknown name(s) {', '.join(bad)}; valid: {', '.join(names)}")
    for k, w in raw.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ConfigError(f"{where}: weight of {k!r} must be a number >= 0 (got {w!r})")
    total = float(sum(raw.values()))
    if total <= 0:
        raise ConfigError(f"{where}: the weights must not all be zero (got {brief(raw)})")
    return {k: float(w) / total for k, w in raw.items()}


def _pick(weights: dict[str, float], rng: np.random.Generator) -> str:
    """One name drawn with the given probabilities (one uniform draw, so records replay exactly)."""
    u, acc = float(rng.random()), 0.0
    for name, w in weights.items():
        acc += w
        if u < acc:
            return name
    return next(n for n, w in reversed(weights.items()) if w > 0)


def _odd_size(spec: Spec, rng: np.random.Generator, ctx: Context) -> int:
    """An odd kernel size: uniform over the odd values of a range, else the value made odd."""
    if spec.mode == "range":
        lo, hi = spec.value
        odd = list(range(lo | 1, hi + 1, 2)) or [lo | 1]
        return odd[int(rng.integers(len(odd)))]
    return int(spec.draw(rng, ctx.variables)) | 1


@register("resize")
class Resize(Op):
    """Resize to the dataset's LR size (`size: lr`, the default), to a short side in px, or by a factor.

    `updown` (Real-ESRGAN's resize_prob) weighs `up`/`down`/`keep`: up draws the factor from [1, hi]
    of the `factor` range, down from [lo, 1], keep uses 1. `relative_to: lr` applies the factor to the
    dataset's LR size instead of the input (Real-ESRGAN's second-stage resize).
    """

    name = "resize"
    keeps_size = False  # its output size is in its record (`size_after`)
    params = {
        "size": Param("int", None, lo=1, nullable=True, doc="'lr' or the short side in px"),
        "factor": Param("float", None, lo=0.01, hi=8.0, nullable=True, doc="scale factor (instead of size)"),
        "interpolation": Param("str", "bicubic", choices=F.INTERPOLATIONS),
        "antialias": Param("bool", True),
        "relative_to": Param("str", "input", choices=("input", "lr"), doc="what `factor` scales"),
        "updown": Param("str", None, nullable=True, doc="{up: w, down: w, keep: w} weights (factor a range)"),
    }
    UPDOWN = ("up", "down", "keep")

    def __init__(self, **raw: Any) -> None:
        if raw.get("size") is not None and raw.get("factor") is not None:
            raise ConfigError("op 'resize': give either size or factor, not both")
        self.to_lr = raw.get("size") == "lr" or (raw.get("size") is None and raw.get("factor") is None)
        updown = raw.get("updown")  # a mapping, parsed here rather than by Spec
        super().__init__(**{**raw, "size": None if self.to_lr else raw.get("size"), "updown": None})
        self.raw = dict(raw)
        if self.specs["relative_to"].mode != "fixed":
            raise ConfigError("op 'resize', parameter 'relative_to': must be input or lr "
                              f"(got {brief(raw['relative_to'])})")
        self._by = self.specs["size"] if raw.get("size") is not None else self.specs["factor"]
        self.updown = None if updown is None else _weights("op 'resize', parameter 'updown'", updown, self.UPDOWN)
        by_factor = self._by is self.specs["factor"] and not self.to_lr
        if (self.updown is not None or (self.needs_lr_size and not self.to_lr)) and not by_factor:
            raise ConfigError("op 'resize': updown and relative_to: lr need a factor")
        if self.updown is not None and (self._by.mode != "range"
                                        or not self._by.value[0] <= 1.0 <= self._by.value[1]):
            raise ConfigError("op 'resize', parameter 'updown': needs factor as a range [low, high] "
                              f"with low <= 1 <= high (got {brief(raw.get('factor'))})")

    @property
    def needs_lr_size(self) -> bool:
        """Whether this resize needs the dataset's LR size (`size: lr` or `relative_to: lr`)."""
        return self.to_lr or self.specs["relative_to"].value == "lr"

    def _factor(self, rng: np.random.Generator, ctx: Context) -> float:
        if self.updown is None:
            return self._by.draw(rng, ctx.variables)
        lo, hi = self._by.value
        way = _pick(self.updown, rng)
        return float(rng.uniform(1.0, hi)) if way == "up" else float(rng.uniform(lo, 1.0)) if way == "down" else 1.0

    def target(self, w: int, h: int, rng: np.random.Generator | None,
               ctx: Context) -> tuple[int, int] | None:
        """Output (width, height) for a w×h input; None when it needs a random draw and `rng` is None."""
        if self.needs_lr_size and ctx.lr_size is None:
            raise ConfigError("op 'resize' with size: lr or relative_to: lr needs the dataset's scale")
        if self.to_lr:
            return ctx.lr_size
        if rng is None and (self._by.mode != "fixed" or self.updown is not None):
            return None
        if self._by is self.specs["factor"]:
            value = self._factor(rng, ctx)
            if self.needs_lr_size:
                w, h = ctx.lr_size
            return max(1, round(w * value)), max(1, round(h * value))
        value = self._by.draw(rng, ctx.variables)
        if w <= h:
            return value, max(1, round(h * value / w))
        return max(1, round(w * value / h)), value

    def sample(self, img, rng, ctx):
        h, w = img.shape[:2]
        width, height = self.target(w, h, rng, ctx)
        return {"width": int(width), "height": int(height),
                "interpolation": self.draw("interpolation", rng, ctx),
                "antialias": self.draw("antialias", rng, ctx)}

    def apply(self, img, width, height, interpolation, antialias):
        return F.resize(img, width, height, interpolation, antialias)

    @classmethod
    def size_after(cls, size, params, visit=None):
        return int(params["width"]), int(params["height"])


@register("gaussian_blur")
class GaussianBlur(Op):
    """Gaussian blur; with probability `anisotropic` the two axes get separate sigmas and a random angle."""

    name = "gaussian_blur"
    keeps_size = True
    params = {
        "sigma": Param("float", [0.2, 3.0], lo=0.05, hi=20.0),
        "anisotropic": Param("float", 0.0, lo=0.0, hi=1.0, doc="probability of an anisotropic kernel"),
        "max_kernel": Param("int", 21, lo=3, hi=101),
    }

    def sample(self, img, rng, ctx):
        aniso_p = self.draw("anisotropic", rng, ctx)
        aniso = bool(aniso_p > 0 and rng.random() < aniso_p)
        sx = self.draw("sigma", rng, ctx)
        sy = self.draw("sigma", rng, ctx) if aniso else sx
        angle = float(rng.uniform(0.0, 180.0)) if aniso else 0.0
        size = F.kernel_size_for(max(sx, sy), self.draw("max_kernel", rng, ctx))
        return {"sigma_x": sx, "sigma_y": sy, "angle": angle, "kernel_size": size}

    def apply(self, img, sigma_x, sigma_y, angle, kernel_size):
        return F.gaussian_blur(img, sigma_x, sigma_y, angle, kernel_size)


@register("blur")
class Blur(Op):
    """Real-ESRGAN's blur: a kernel type drawn from `kernels` (weights), or with probability `sinc_p` a sinc.

    Types: iso/aniso Gaussian, generalized Gaussian and plateau (β from `betag`/`betap`; β = 2 is the
    Gaussian's shape, twice BasicSR's betag/betap). Anisotropic types draw σx, σy from `sigma` and an
    angle; the size is odd, uniform over `kernel_size`. `omega_c: null` is BasicSR's sinc cutoff rule
    (U[π/3, π] below 13 taps, else U[π/5, π]). The record names the kernel's parameters, not its taps.
    """

    name = "blur"
    keeps_size = True  # mirrored borders: the same size
    params = {
        "sigma": Param("float", [0.2, 3.0], lo=0.05, hi=20.0),
        "betag": Param("float", [1.0, 8.0], lo=0.1, hi=20.0, doc="generalized Gaussian exponent β (2 = Gaussian)"),
        "betap": Param("float", [2.0, 4.0], lo=0.1, hi=20.0, doc="plateau exponent β"),
        "kernel_size": Param("int", [7, 21], lo=3, hi=51, doc="odd sizes in this range, equally likely"),
        "sinc_p": Param("float", 0.0, lo=0.0, hi=1.0, doc="probability of a sinc kernel instead"),
        "omega_c": Param("float", None, lo=0.01, hi=math.pi, nullable=True, doc="sinc cutoff (radians)"),
        "kernels": Param("str", None, nullable=True, doc="{type: weight} (default Real-ESRGAN's kernel_prob)"),
    }
    # Real-ESRGAN's kernel_list / kernel_prob
    DEFAULT_KERNELS = {"iso": 0.45, "aniso": 0.25, "generalized_iso": 0.12, "generalized_aniso": 0.03,
                       "plateau_iso": 0.12, "plateau_aniso": 0.03}

    def __init__(self, **raw: Any) -> None:
        kernels = raw.get("kernels")  # a mapping, parsed here rather than by Spec
        super().__init__(**{**raw, "kernels": None})
        self.raw = dict(raw)
        self.kernels = _weights("op 'blur', parameter 'kernels'", self.DEFAULT_KERNELS if kernels is None else kernels,
                                F.BLUR_KERNELS)

    def _beta(self, key: str, rng: np.random.Generator, ctx: Context) -> float:
        spec = self.specs[key]
        if spec.mode == "range" and spec.value[0] < 2.0 < spec.value[1]:
            # as BasicSR: below and above the Gaussian's shape equally often, whatever the range's split
            lo, hi = spec.value
            return float(rng.uniform(lo, 2.0)) if rng.random() < 0.5 else float(rng.uniform(2.0, hi))
        return float(spec.draw(rng, ctx.variables))

    def sample(self, img, rng, ctx):
        size = _odd_size(self.specs["kernel_size"], rng, ctx)
        sinc_p = self.draw("sinc_p", rng, ctx)
        if sinc_p > 0 and rng.random() < sinc_p:
            omega_c = self.draw("omega_c", rng, ctx)
            if omega_c is None:
                omega_c = float(rng.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi))
            return {"kernel": "sinc", "size": size, "omega_c": omega_c}
        kernel = _pick(self.kernels, rng)
        sx = self.draw("sigma", rng, ctx)
        out: dict[str, Any] = {"kernel": kernel, "size": size, "sigma_x": sx}
        if kernel == "aniso" or kernel.endswith("_aniso"):
            out["sigma_y"] = self.draw("sigma", rng, ctx)
            out["angle"] = float(rng.uniform(0.0, 180.0))
        if kernel.startswith("generalized"):
            out["beta"] = self._beta("betag", rng, ctx)
        elif kernel.startswith("plateau"):
            out["beta"] = self._beta("betap", rng, ctx)
        return out

    def apply(self, img, kernel, size, sigma_x=1.0, sigma_y=None, angle=0.0, beta=2.0, omega_c=None):
        return F.filter_kernel(img, F.blur_kernel(kernel, size, sigma_x, sigma_y, angle, beta, omega_c))


@register("sinc")
class Sinc(Op):
    """Circular low-pass ("sinc") filter, Real-ESRGAN's final ringing/overshoot step (give it `p`)."""

    name = "sinc"
    keeps_size = True
    params = {
        "omega_c": Param("float", [math.pi / 3, math.pi], lo=0.01, hi=math.pi, doc="cutoff (radians, π = Nyquist)"),
        "kernel_size": Param("int", [7, 21], lo=3, hi=51, doc="odd sizes in this range, equally likely"),
    }

    def sample(self, img, rng, ctx):
        size = _odd_size(self.specs["kernel_size"], rng, ctx)
        return {"omega_c": self.draw("omega_c", rng, ctx), "size": size}

    def apply(self, img, omega_c, size):
        return F.filter_kernel(img, F.sinc_kernel(omega_c, size))


@register("motion_blur")
class MotionBlur(Op):
    """Straight-line motion blur of a sampled length (px, made odd) and angle (degrees)."""

    name = "motion_blur"
    keeps_size = True
    params = {"length": Param("int", [3, 15], lo=3, hi=101), "angle": Param("float", [0.0, 360.0])}

    def sample(self, img, rng, ctx):
        return {"length": self.draw("length", rng, ctx) | 1, "angle": self.draw("angle", rng, ctx)}

    def apply(self, img, length, angle):
        return F.motion_blur(img, length, angle)


@register("noise")
class Noise(Op):
    """Gaussian (`sigma`, 0-255 scale) or Poisson (`scale`) noise, grey with probability `gray_p`."""

    name = "noise"
    keeps_size = True
    params = {
        "kind": Param("str", "gaussian", choices=("gaussian", "poisson")),
        "sigma": Param("float", [1.0, 30.0], lo=0.0, hi=255.0),
        "scale": Param("float", [0.05, 3.0], lo=0.0, hi=50.0),
        "gray_p": Param("float", 0.0, lo=0.0, hi=1.0),
    }

    def sample(self, img, rng, ctx):
        kind = self.draw("kind", rng, ctx)
        amount = self.draw("sigma" if kind == "gaussian" else "scale", rng, ctx)
        gray_p = self.draw("gray_p", rng, ctx)
        gray = bool(gray_p > 0 and rng.random() < gray_p)
        return {"kind": kind, "amount": amount, "gray": gray, "seed": _random_seed(rng)}

    def apply(self, img, kind, amount, gray, seed):
        fn = F.gaussian_noise if kind == "gaussian" else F.poisson_noise
        return fn(img, amount, gray, seed)


@register("jpeg")
class Jpeg(Op):
    """JPEG compression at a sampled quality; the encoded bytes are kept for the builder."""

    name = "jpeg"
    keeps_size = True
    params = {"quality": Param("int", [30, 95], lo=1, hi=100)}

    def sample(self, img, rng, ctx):
        return {"quality": self.draw("quality", rng, ctx)}

    def apply(self, img, quality):
        return F.jpeg(img, quality)

    def forward(self, img, rng, ctx):
        params = self.sample(img, rng, ctx)
        return None, F.jpeg_encode(img, params["quality"]), params

    def replay(self, img, params):
        return None, F.jpeg_encode(img, params["quality"])


@register("occlude")
class Occlude(Op):
    """Occluding rectangles: `count` of them, each side a `size` fraction of the short side."""

    name = "occlude"
    keeps_size = True  # paints over the image
    params = {
        "count": Param("int", [1, 3], lo=0, hi=100),
        "size": Param("float", [0.05, 0.25], lo=0.0, hi=1.0),
        "fill": Param("str", ["black", "noise", "mean"], choices=F.FILLS),
    }

    def sample(self, img, rng, ctx):
        h, w = img.shape[:2]
        short = min(w, h)
        rects = []
        for _ in range(self.draw("count", rng, ctx)):
            rw = min(w, max(1, round(self.draw("size", rng, ctx) * short)))
            rh = min(h, max(1, round(self.draw("size", rng, ctx) * short)))
            rects.append([int(rng.integers(0, w - rw + 1)), int(rng.integers(0, h - rh + 1)), rw, rh])
        return {"rects": rects, "fill": self.draw("fill", rng, ctx), "seed": _random_seed(rng)}

    def apply(self, img, rects, fill, seed):
        return F.occlude(img, rects, fill, seed)


@register("text")
class Text(Op):
    """Text overlay at a random point in the top-left `region` of the image (lesson 7 writes the quality)."""

    name = "text"
    keeps_size = True
    params = {
        "text": Param("str", "crappify", doc="literal, list of choices, or $variable"),
        "font_scale": Param("float", 0.35, lo=0.05, hi=10.0),
        "color": Param("color", [255, 255, 255]),
        "region": Param("float", 0.5, lo=0.0, hi=1.0, doc="fraction of width/height the origin may lie in"),
    }

    def sample(self, img, rng, ctx):
        h, w = img.shape[:2]
        message = self.draw("text", rng, ctx)
        scale = self.draw("font_scale", rng, ctx)
        region = self.draw("region", rng, ctx)
        _, th = F.text_size(message, scale)
        x = int(rng.integers(0, int(w * region) + 1))
        y = int(rng.integers(0, int(h * region) + 1)) + th  # OpenCV places the baseline, PIL the top
        return {"text": message, "x": x, "y": y, "font_scale": scale, "color": self.draw("color", rng, ctx)}

    def apply(self, img, text, x, y, font_scale, color):
        return F.text(img, text, x, y, font_scale, tuple(color))


@register("color_jitter")
class ColorJitter(Op):
    """Brightness/contrast/saturation factors and a hue shift (turns), torchvision-style."""

    name = "color_jitter"
    keeps_size = True
    params = {
        "brightness": Param("float", [0.8, 1.2], lo=0.0, hi=5.0),
        "contrast": Param("float", [0.8, 1.2], lo=0.0, hi=5.0),
        "saturation": Param("float", [0.8, 1.2], lo=0.0, hi=5.0),
        "hue": Param("float", [-0.02, 0.02], lo=-0.5, hi=0.5),
    }

    def sample(self, img, rng, ctx):
        return {k: self.draw(k, rng, ctx) for k in ("brightness", "contrast", "saturation", "hue")}

    def apply(self, img, brightness, contrast, saturation, hue):
        return F.color_jitter(img, brightness, contrast, saturation, hue)


@register("desaturate")
class Desaturate(Op):
    """Blend toward greyscale by `amount` (0 keeps colour, 1 is grey), like old or faded photos."""

    name = "desaturate"
    keeps_size = True
    params = {"amount": Param("float", [0.0, 1.0], lo=0.0, hi=1.0)}

    def sample(self, img, rng, ctx):
        return {"amount": self.draw("amount", rng, ctx)}

    def apply(self, img, amount):
        return F.desaturate(img, amount)
