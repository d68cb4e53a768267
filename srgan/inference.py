"""Tiled inference: run a generator on an image of any size with memory bounded by the tile size.

The image (HWC uint8, held on the CPU) is padded by reflection to what the model needs (a multiple of 32
for U-Nets, whose encoder downsamples 32x; nothing for SRResNet) and cut into equal, overlapping tiles
whose origins are multiples of that step, so every tile sees the same pooling grid as the whole image
would. Tiles go through the model in batches; their outputs are blended with separable raised-cosine
ramps over the overlaps (weights normalised to sum to 1, so there are no seams), into a float strip on the
device about one row of tiles high; rows no later tile touches are rounded into the uint8 output. So memory is
the model on one batch of tiles plus one strip of output — not the image's pixel count squared, which
is what the U-Net's self-attention layer would need on a whole large photo.

A U-Net's input is the photo upscaled (bicubic, `srgan.upsample`) to the output size. With `upscale` the engine
does that itself, tile by tile, each tile from just the photo pixels its bicubic taps reach: the same pixels as
resizing the whole photo first (to rounding: within 1 grey level), without ever holding the upscaled photo.

Out of memory (torch's, or numpy's MemoryError) → the batch, then the tile, is halved and the image redone.
Reduced precision (bf16/fp16 autocast) falls back to fp32 where the device does not support it, and a batch
whose output holds NaN or inf is recomputed in fp32 (and fp32 is kept from then on).

`compile`: the generator's forward compiled by torch.compile (`srgan.runtime.compile_module`, dynamic=False), which
pays when one input shape runs many times. So the tiles then have one shape (`fixed_tiles`): every tile is `tile` px
square (not shrunk to fit the photo), a photo smaller than a tile is padded by reflection up to one, and the last
batch of a photo is filled up with copies of its last tile — one compilation for every photo of a run (another
only after an out-of-memory retry or the fp32 fallback). Photos whose sides are not covered exactly by tiles then
get other tile borders than without `compile`, so outputs differ by the tiling (as between two tile sizes), not
by compilation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crappify.errors import ConfigError, CrappifyError
from srgan.generators import UNET_MULTIPLE, model_multiple, model_scale  # noqa: F401  (UNET_MULTIPLE: re-export)
from srgan.normalize import Normalizer
from srgan.runtime import PRECISIONS, compile_module, is_oom, resolve_inference_precision  # noqa: F401  (re-exports)
from srgan.upsample import resize_image

DEFAULT_TILE = 512  # output pixels per tile side; SR models take tile // scale input pixels
# On a GPU, 512 px tiles leave it idle between small forward passes and pay for their overlaps: a 1024² photo
# became 9 tiles and ran at 0.56× the untiled speed on an H100 (benchmarks/README.md). 1024 px tiles fit
# any recent GPU (2.5 GiB for a ResNet-34 U-Net in fp32) and keep memory bounded all the same.
DEFAULT_TILE_CUDA = 1024
MIN_TILE = 32

Progress = Callable[[int, int], None]


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start positions of tiles of `tile` px covering [0, length): every `stride`, the last flush with the end."""
    if tile >= length:
        return [0]
    origins = list(range(0, length - tile, stride))
    origins.append(length - tile)
    return origins


def fit_tile(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The smallest tile (a multiple of `multiple`, at most `tile`) that covers `length` with as few tiles as
    `tile` would: the same number of forward passes, spread evenly, with less work wasted on overlaps."""
    if tile >= length:
        return length
    n = -(-(length - overlap) // (tile - overlap))
    return min(tile, _round_up(-(-(length + (n - 1) * overlap) // n), multiple))


def _ramp(n: int) -> torch.Tensor:
    """n weights rising smoothly (raised cosine) from near 0 to near 1, all > 0."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def axis_weights(origins: list[int], tile: int, length: int, ramp: int) -> list[torch.Tensor]:
    """Per-tile 1-D blending weights along one axis, normalised so they sum to 1 at every position.

    A tile ramps up over `ramp` px on a side where a neighbour overlaps it; image borders get weight 1.
    Because the tiles form a full grid, 2-D weights are outer products and stay normalised.
    """
    raw = []
    total = torch.zeros(length, dtype=torch.float64)
    for i, o in enumerate(origins):
        w = torch.ones(tile, dtype=torch.float64)
        r = min(ramp, tile // 2)
        if r > 0 and i > 0:
            w[:r] *= _ramp(r)
        if r > 0 and i < len(origins) - 1:
            w[tile - r:] *= _ramp(r).flip(0)
        raw.append(w)
        total[o:o + tile] += w
    return [(w / total[o:o + tile]).float() for w, o in zip(raw, origins, strict=True)]


@dataclass
class TiledInference:
    """A generator ready for images of any size. Call it on an HWC uint8 RGB array at the model's input size.

    `tile`: tile side in input pixels (None: 512 output pixels, i.e. 512 // scale input pixels; 0: the whole
    image in one piece). `overlap`: input pixels shared by neighbouring tiles (None: tile // 8). Both are
    rounded up to what the model needs; an image is covered by as few tiles as `tile` allows, spread evenly
    (so tiles may be smaller than `tile`, never larger). `batch`: tiles per forward pass (default 1: peak
    memory is then set by the tile alone). `data_scale`: HR/LR ratio of the data a U-Net was trained on (its
    inputs were LR photos resized back up by that much), read from the generator file by `load_inference`.
    `compile`: torch.compile the generator (see the module docstring); `fixed_tiles` (default: as `compile`):
    every forward pass the same shape — `batch` tiles of exactly `tile` px.
    """

    model: nn.Module
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    normalizer: Normalizer = field(default_factory=Normalizer)
    channels_last: bool = False
    data_scale: int = 1
    notes: list[str] = field(default_factory=list)
    on_note: Callable[[str], None] | None = None
    compile: bool = False
    fixed_tiles: bool | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scale = model_scale(self.model)
        self.multiple = model_multiple(self.model)
        self.precision, note = resolve_inference_precision(self.precision, self.device)
        if note:
            self._note(note)
        if self.tile is None:
            default = DEFAULT_TILE_CUDA if self.device.type == "cuda" else DEFAULT_TILE
            self.tile = max(MIN_TILE, default // self.scale)
        if self.tile < 0 or (self.overlap is not None and self.overlap < 0):
            raise ConfigError(f"tile and overlap must be >= 0, got {self.tile} and {self.overlap}")
        if self.tile:
            self.tile = max(_round_up(self.tile, self.multiple), 2 * self.multiple, 8)
        if self.batch is None:
            self.batch = 1
        if self.batch < 1:
            raise ConfigError(f"tile batch must be >= 1, got {self.batch}")
        if self.fixed_tiles is None:
            self.fixed_tiles = self.compile
        self.model = compile_module(self.model, self.compile, self.device)
        if self.compile and not self.tile:
            self._note("--compile with --tile 0 compiles the model again for every photo size")

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.on_note is not None:
            self.on_note(text)
        else:
            warnings.warn(text, stacklevel=3)

    def _overlap(self, tile: int) -> int:
        """Overlap for `tile`: as asked (default tile // 8), a multiple of the model's step, < tile."""
        ov = tile // 8 if self.overlap is None else self.overlap
        ov = _round_up(ov, self.multiple)
        return min(ov, tile - self.multiple) if tile > self.multiple else 0

    def __call__(self, img: np.ndarray, progress: Progress | None = None, upscale: int = 1) -> np.ndarray:
        """HWC uint8 RGB → HWC uint8 RGB, `upscale` × `scale` times larger; retries with smaller batches/tiles on OOM.

        `upscale`: the model's input is `img` resized by this integer factor (bicubic, as `srgan.upsample.resize_image`
        would), computed tile by tile. The output array is allocated first: a MemoryError there is not retried.
        """
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 RGB array, got shape {img.shape} dtype {img.dtype}")
        if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale < 1:
            raise ConfigError(f"upscale must be a positive integer, got {upscale!r}")
        src = Upscaled(img, upscale)
        out = np.empty((src.height * self.scale, src.width * self.scale, 3), np.uint8)
        while True:
            try:
                return self._run(src, out, progress)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self._shrink(src)

    def _shrink(self, src: Upscaled) -> None:
        """After an out-of-memory error: halve the batch, else the tile; give up below the smallest tile."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch //= 2
            self._note(f"out of memory: retrying with {self.batch} tile(s) per batch")
            return
        current = self.tile or max(src.height, src.width)
        smaller = max(_round_up(current // 2, self.multiple), 2 * self.multiple, MIN_TILE)
        if smaller >= current:
            raise CrappifyError(f"out of memory on {self.device} even with {current} px tiles; "
                                "free memory or use another device") from None
        self.tile = smaller
        self._note(f"out of memory: retrying with {smaller} px tiles")

    @torch.inference_mode()
    def _run(self, src: Upscaled, out: np.ndarray, progress: Progress | None) -> np.ndarray:
        h, w = src.height, src.width
        s, m = self.scale, self.multiple
        hp, wp = _round_up(h, m), _round_up(w, m)
        fixed = bool(self.tile and self.fixed_tiles)
        if fixed:  # every tile `tile` px square (one shape to compile): a smaller photo is padded up to one tile
            hp, wp = max(hp, self.tile), max(wp, self.tile)
        # the input padded by reflection to (hp, wp), as source indices: tiles are cut from it without a copy
        rows, cols = _pad_index(h, hp - h), _pad_index(w, wp - w)
        ov = self._overlap(min(self.tile, hp, wp)) if self.tile else 0
        if fixed:
            th = tw = self.tile
        else:
            th, tw = (fit_tile(hp, self.tile, ov, m), fit_tile(wp, self.tile, ov, m)) if self.tile else (hp, wp)
        stride_h, stride_w = max(th - ov, m), max(tw - ov, m)
        ys, xs = tile_origins(hp, th, stride_h), tile_origins(wp, tw, stride_w)
        wy = [t.to(self.device) for t in axis_weights([y * s for y in ys], th * s, hp * s, ov * s)]
        wx = [t.to(self.device) for t in axis_weights([x * s for x in xs], tw * s, wp * s, ov * s)]
        # Tiles go in row-major order, `batch` at a time, a batch may span rows. The strip holds the output rows
        # from `top` down to the bottom of the last tile added; rows above the next tile's origin are final and
        # are rounded into `out` and dropped, so the strip is about one row of tiles high (more only when a
        # batch spans rows).
        order = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
        strip = torch.zeros(3, 0, wp * s, device=self.device)
        top = 0
        for start in range(0, len(order), self.batch):
            chunk = order[start:start + self.batch]
            tiles = np.stack([src.take(rows[ys[i]:ys[i] + th], cols[xs[j]:xs[j] + tw]) for i, j in chunk])
            if fixed and len(chunk) < self.batch:  # a short last batch filled up with copies: one shape
                tiles = np.concatenate([tiles, np.repeat(tiles[-1:], self.batch - len(chunk), axis=0)])
            pred = self._forward(tiles)
            bottom = ys[chunk[-1][0]] * s + th * s
            if bottom - top > strip.shape[1]:
                grow = torch.zeros(3, bottom - top - strip.shape[1], wp * s, device=self.device)
                strip = torch.cat([strip, grow], dim=1)
            for k, (i, j) in enumerate(chunk):  # pred is (B, 3, th*s, tw*s) in 0..255
                y, x = ys[i] * s - top, xs[j] * s
                strip[:, y:y + th * s, x:x + tw * s] += pred[k] * wy[i][None, :, None] * wx[j][None, None, :]
            if progress is not None:
                progress(start + len(chunk), len(order))
            final = ys[order[start + len(chunk)][0]] * s if start + len(chunk) < len(order) else hp * s
            if final > top:
                self._flush(out, strip[:, :final - top], top)
                strip, top = strip[:, final - top:], final
        return out

    def _flush(self, out: np.ndarray, rows: torch.Tensor, top: int) -> None:
        """Round finished strip rows (3, n, W) into `out` from row `top`, clipped to the unpadded size."""
        n = min(rows.shape[1], out.shape[0] - top)
        if n <= 0:
            return
        u8 = rows[:, :n, : out.shape[1]].round().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        out[top:top + n] = u8.cpu().numpy()

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        """A batch of uint8 NHWC tiles → model output in 0..255 float32 (NCHW), NaN-checked."""
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        x = self.normalizer.normalize(x)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        y = self._model(x, self.precision)
        if self.precision != "fp32" and not torch.isfinite(y).all():
            self._note(f"{self.precision} gave NaN/inf outputs; recomputing in fp32 (and keeping fp32)")
            self.precision = "fp32"
            y = self._model(x, "fp32")
        if not torch.isfinite(y).all():
            raise CrappifyError("the model produced NaN/inf outputs even in fp32; the generator file is broken")
        return self.normalizer.denormalize(y) * 255.0

    def _model(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        if precision == "fp32":
            return self.model(x).float()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype):
            return self.model(x).float()


def load_inference(path: str | Path, device: torch.device | str = "cpu", *, compile: bool = False,
                   **options) -> TiledInference:
    """A TiledInference for a `generator.safetensors` file (no loss networks, no pretrained downloads); `compile`:
    torch.compile the generator, tiles of one shape (see the module docstring)."""
    from srgan.checkpoint import load_generator, read_generator_meta

    meta = read_generator_meta(path)
    stats = meta.get("normalization")
    normalizer = Normalizer(tuple(stats)) if stats else Normalizer()
    options.setdefault("data_scale", int(meta["extra"].get("data_scale") or 1))
    return TiledInference(load_generator(path, device), device=device, normalizer=normalizer, compile=compile,
                          **options)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_index(n: int, pad: int) -> np.ndarray:
    """Indices 0..n-1 padded at the end by reflection (edge replication for a 1-px side, where reflection is
    undefined): padding an image along an axis is indexing it with these."""
    return np.pad(np.arange(n), (0, pad), mode="reflect" if n > 1 else "edge")


class Upscaled:
    """An HWC uint8 image resized by an integer `factor` (bicubic, `srgan.upsample.resize_image`), read one region
    at a time: each region is resized from just the pixels its taps reach, so the whole upscaled image is never
    held. The cubic kernel reaches 2 px from a pixel's centre; with `MARGIN` px more on each side (clipped at the
    image's edges, where the resize mirrors the image itself) a region equals the same region of the whole image
    resized at once, up to float rounding (within 1 grey level)."""

    MARGIN = 3

    def __init__(self, img: np.ndarray, factor: int = 1) -> None:
        self.img, self.factor = img, int(factor)
        self.height, self.width = img.shape[0] * self.factor, img.shape[1] * self.factor

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0..y1-1 and columns x0..x1-1 of the upscaled image."""
        f = self.factor
        if f == 1:
            return self.img[y0:y1, x0:x1]
        h, w = self.img.shape[:2]
        ly0, ly1 = max(0, y0 // f - self.MARGIN), min(h, -(-y1 // f) + self.MARGIN)
        lx0, lx1 = max(0, x0 // f - self.MARGIN), min(w, -(-x1 // f) + self.MARGIN)
        up = resize_image(self.img[ly0:ly1, lx0:lx1], ((lx1 - lx0) * f, (ly1 - ly0) * f))
        return up[y0 - ly0 * f:y1 - ly0 * f, x0 - lx0 * f:x1 - lx0 * f]

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The upscaled image at these row and column indices (e.g. a tile of the reflection-padded image)."""
        r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        block = self.region(r0, r1, c0, c1)
        if r1 - r0 == len(rows) and c1 - c0 == len(cols) and (np.diff(rows) == 1).all() and (np.diff(cols) == 1).all():
            return block
        return block[np.ix_(rows - r0, cols - c0)]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Whole rows y0..y1-1 of the upscaled image."""
        return self.region(y0, y1, 0, self.width)
