"""Tiled inference: run a generator on an image of any size with memory bounded by the tile size.

The image (HWC uint8, held on the CPU) is padded by reflection to what the model needs (a multiple of 32
for U-Nets, whose encoder downsamples 32x; nothing for SRResNet) and cut into equal, overlapping tiles
whose origins are multiples of that step, so every tile sees the same pooling grid as the whole image
would. Tiles go through the model in batches; their outputs are blended with separable raised-cosine
ramps over the overlaps (weights normalised to sum to 1, so there are no seams), into a float strip on the
device about one row of tiles high; rows no later tile touches are rounded into the uint8 output. A photo wider
than `BAND_TILES` tiles is done in vertical bands of that many tile columns, each band's strip only as wide as its
tiles (the tiles straddling a band's edge run once for each band: the same sums, in the same order). So memory is
the model on one batch of tiles plus a strip bounded by the tile in both directions — not the image's width (a
1×20,000,000 px photo once asked for a 7.7 GB strip), nor its pixel count squared, which is what the U-Net's
self-attention layer would need on a whole large photo. Only the uint8 output is the size of the image.

A U-Net's input is the photo upscaled (bicubic, `srgan.upsample`) to the output size. With `input_scale` the engine
does that itself, tile by tile, each tile from just the photo pixels its bicubic taps reach: the same pixels as
resizing the whole photo first (to rounding: within 1 grey level), without ever holding the upscaled photo.

Out of memory (torch's, or numpy's MemoryError) → the batch, then the tile, is halved and the image redone; below
the smallest tile `OutOfMemory` is raised and the engine goes back to the tile and batch it had for the next image.
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
from srgan.generators import model_multiple, model_scale
from srgan.normalize import Normalizer
from srgan.runtime import compile_module, is_oom, resolve_inference_precision
from srgan.upsample import resize_image

DEFAULT_TILE = 512  # output pixels per tile side; SR models take tile // scale input pixels
# On a GPU, 512 px tiles leave it idle between small forward passes and pay for their overlaps: a 1024² photo
# became 9 tiles and ran at 0.56× the untiled speed on an H100 (benchmarks/README.md). 1024 px tiles fit
# any recent GPU (2.5 GiB for a ResNet-34 U-Net in fp32) and keep memory bounded all the same.
DEFAULT_TILE_CUDA = 1024
MIN_TILE = 32
BAND_TILES = 16  # tile columns per band: the float strip is at most this many tiles wide (plus their overlaps)

Progress = Callable[[int, int], None]


class OutOfMemory(CrappifyError):
    """An image that runs out of memory even with the smallest tile: it cannot be done on this device."""


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


def _raw_weight(i: int, n: int, tile: int, ramp: int) -> torch.Tensor:
    """Tile i of n: 1, ramping up over `ramp` px on a side where a neighbour overlaps it."""
    w = torch.ones(tile, dtype=torch.float64)
    r = min(ramp, tile // 2)
    if r > 0 and i > 0:
        w[:r] *= _ramp(r)
    if r > 0 and i < n - 1:
        w[tile - r:] *= _ramp(r).flip(0)
    return w


def axis_weight(origins: list[int], i: int, tile: int, ramp: int) -> torch.Tensor:
    """The 1-D blending weights of tile i along one axis, normalised so that all tiles' weights sum to 1 at every
    position. Only the tiles overlapping tile i are summed (in the order of `origins`, as over the whole axis:
    the same float sums), so a tile's weights cost its own size, never the axis's length.

    Because the tiles form a full grid, 2-D weights are outer products and stay normalised.
    """
    o, n = origins[i], len(origins)
    first = i
    while first > 0 and origins[first - 1] + tile > o:
        first -= 1
    total = torch.zeros(tile, dtype=torch.float64)
    for j in range(first, n):
        if origins[j] >= o + tile:
            break
        a, b = max(o, origins[j]), min(o, origins[j]) + tile
        total[a - o:b - o] += _raw_weight(j, n, tile, ramp)[a - origins[j]:b - origins[j]]
    return (_raw_weight(i, n, tile, ramp) / total).float()


def axis_weights(origins: list[int], tile: int, length: int, ramp: int) -> list[torch.Tensor]:
    """`axis_weight` of every tile (`length`, the axis's, is implied by the last origin and kept for callers)."""
    return [axis_weight(origins, i, tile, ramp) for i in range(len(origins))]


class _Weights:
    """`axis_weight` of one axis's tiles on the device, computed when first asked for; at most `keep` kept."""

    def __init__(self, origins: list[int], tile: int, ramp: int, device: torch.device, keep: int = 4 * BAND_TILES):
        self.origins, self.tile, self.ramp, self.device, self.keep = origins, tile, ramp, device, keep
        self.cache: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> torch.Tensor:
        w = self.cache.get(i)
        if w is None:
            if len(self.cache) >= self.keep:
                self.cache.clear()
            w = self.cache[i] = axis_weight(self.origins, i, self.tile, self.ramp).to(self.device)
        return w


def bands(origins: list[int], tile: int, per_band: int = BAND_TILES) -> list[tuple[int, int, int]]:
    """Vertical bands of a tile grid, as (lo, a, b): the band finalises the output columns from origins[a] to
    origins[b] (the axis's end for the last band) and needs tiles lo..b-1 for them (tiles a..b-1 and those
    before a that reach past origins[a])."""
    out = []
    for a in range(0, len(origins), per_band):
        lo = a
        while lo > 0 and origins[lo - 1] + tile > origins[a]:
            lo -= 1
        out.append((lo, a, min(a + per_band, len(origins))))
    return out


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
    every forward pass the same shape — `batch` tiles of exactly `tile` px. `channels_last` (default on, as in
    training): the model and its tiles in channels-last memory format, which the tiles already are (NHWC), and
    which oneDNN convolves faster: a ResNet-34 U-Net or an RRDB x4 a quarter faster on a 2-core CPU.
    """

    model: nn.Module
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    tile: int | None = None
    overlap: int | None = None
    batch: int | None = None
    normalizer: Normalizer = field(default_factory=Normalizer)
    channels_last: bool = True
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
        self.model_scale = model_scale(self.model)
        self.multiple = model_multiple(self.model)
        self.precision, note = resolve_inference_precision(self.precision, self.device)
        if note:
            self._note(note)
        if self.tile is None:
            default = DEFAULT_TILE_CUDA if self.device.type == "cuda" else DEFAULT_TILE
            self.tile = max(MIN_TILE, default // self.model_scale)
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

    def __call__(self, img: np.ndarray, progress: Progress | None = None, input_scale: int = 1) -> np.ndarray:
        """HWC uint8 RGB → HWC uint8 RGB, `input_scale` × `model_scale` times larger; retries with smaller
        batches/tiles on OOM.

        `input_scale`: the model's input is `img` resized by this integer factor (bicubic, as
        `srgan.upsample.resize_image` would), computed tile by tile. The output array is allocated first: a
        MemoryError there is not retried.
        """
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an HWC uint8 RGB array, got shape {img.shape} dtype {img.dtype}")
        if isinstance(input_scale, bool) or not isinstance(input_scale, int) or input_scale < 1:
            raise ConfigError(f"input_scale must be a positive integer, got {input_scale!r}")
        src = Upscaled(img, input_scale)
        out = np.empty((src.height * self.model_scale, src.width * self.model_scale, 3), np.uint8)
        asked = self.tile, self.batch
        while True:
            try:
                return self._run(src, out, progress)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                try:
                    self._shrink(src)
                except OutOfMemory:
                    self.tile, self.batch = asked  # this image cannot be done; the next one starts as this one did
                    raise

    def _shrink(self, src: Upscaled) -> None:
        """After an out-of-memory error: halve the batch, else the tile; OutOfMemory below the smallest tile."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch //= 2
            self._note(f"out of memory: retrying with {self.batch} tile(s) per batch")
            return
        current = self.tile or max(src.height, src.width)
        smaller = max(_round_up(current // 2, self.multiple), 2 * self.multiple, MIN_TILE)
        if smaller >= current:
            raise OutOfMemory(f"out of memory on {self.device} even with {current} px tiles; "
                              "free memory or use another device") from None
        self.tile = smaller
        self._note(f"out of memory: retrying with {smaller} px tiles")

    @torch.inference_mode()
    def _run(self, src: Upscaled, out: np.ndarray, progress: Progress | None) -> np.ndarray:
        h, w = src.height, src.width
        s, m = self.model_scale, self.multiple
        hp, wp = _round_up(h, m), _round_up(w, m)
        fixed = bool(self.tile and self.fixed_tiles)
        if fixed:  # every tile `tile` px square (one shape to compile): a smaller photo is padded up to one tile
            hp, wp = max(hp, self.tile), max(wp, self.tile)
        ov = self._overlap(min(self.tile, hp, wp)) if self.tile else 0
        if fixed:
            th = tw = self.tile
        else:
            th, tw = (fit_tile(hp, self.tile, ov, m), fit_tile(wp, self.tile, ov, m)) if self.tile else (hp, wp)
        grid = _Grid(h, w, hp, wp, th, tw, s, tile_origins(hp, th, max(th - ov, m)),
                     tile_origins(wp, tw, max(tw - ov, m)))
        wy = _Weights([y * s for y in grid.ys], th * s, ov * s, self.device)
        xs_out = [x * s for x in grid.xs]
        parts = bands(grid.xs, tw, BAND_TILES)
        total = len(grid.ys) * sum(b - lo for lo, _a, b in parts)
        done = 0
        for lo, a, b in parts:
            wx = _Weights(xs_out, tw * s, ov * s, self.device, keep=b - lo)
            done = self._band(src, out, grid, lo, a, b, wy, wx, fixed, (done, total), progress)
        return out

    def _band(self, src: Upscaled, out: np.ndarray, grid: _Grid, lo: int, a: int, b: int, wy: _Weights,
              wx: _Weights, fixed: bool, count: tuple[int, int], progress: Progress | None) -> int:
        """Tile columns lo..b-1 of the grid, finalising output columns xs[a]·s up to xs[b]·s; returns the tiles done.

        Tiles go in row-major order, `batch` at a time, a batch may span rows. The strip holds the output rows from
        `top` down to the bottom of the last tile added, and the columns of tiles lo..b-1; rows above the next
        tile's origin are final and are rounded into `out` and dropped, so the strip is about one row of tiles high
        (more only when a batch spans rows).
        """
        s, th, tw, ys, xs = grid.scale, grid.th, grid.tw, grid.ys, grid.xs
        x0 = xs[lo] * s  # the strip's first column
        cols = (xs[a] * s, xs[b] * s if b < len(xs) else grid.wp * s)  # the columns this band finalises
        width = (xs[b - 1] + tw) * s - x0
        order = [(i, j) for i in range(len(ys)) for j in range(lo, b)]
        strip = torch.zeros(3, 0, width, device=self.device)
        top = 0
        done, total = count
        for start in range(0, len(order), self.batch):
            chunk = order[start:start + self.batch]
            tiles = np.stack([src.take(grid.rows(ys[i], th), grid.cols(xs[j], tw)) for i, j in chunk])
            if fixed and len(chunk) < self.batch:  # a short last batch filled up with copies: one shape
                tiles = np.concatenate([tiles, np.repeat(tiles[-1:], self.batch - len(chunk), axis=0)])
            pred = self._forward(tiles)
            bottom = ys[chunk[-1][0]] * s + th * s
            if bottom - top > strip.shape[1]:
                grow = torch.zeros(3, bottom - top - strip.shape[1], width, device=self.device)
                strip = torch.cat([strip, grow], dim=1)
            for k, (i, j) in enumerate(chunk):  # pred is (B, 3, th*s, tw*s) in 0..255
                y, x = ys[i] * s - top, xs[j] * s - x0
                strip[:, y:y + th * s, x:x + tw * s] += pred[k] * wy[i][None, :, None] * wx[j][None, None, :]
            done += len(chunk)
            if progress is not None:
                progress(done, total)
            final = ys[order[start + len(chunk)][0]] * s if start + len(chunk) < len(order) else grid.hp * s
            if final > top:
                self._flush(out, strip[:, :final - top], top, x0, cols)
                strip, top = strip[:, final - top:], final
        return done

    def _flush(self, out: np.ndarray, rows: torch.Tensor, top: int, x0: int = 0,
               cols: tuple[int, int] | None = None) -> None:
        """Round finished strip rows (3, n, W), whose first column is output column `x0`, into `out` from row `top`:
        output columns `cols` (default: all the strip's), clipped to the unpadded size."""
        c0, c1 = cols if cols is not None else (x0, x0 + rows.shape[2])
        n, c1 = min(rows.shape[1], out.shape[0] - top), min(c1, out.shape[1])
        if n <= 0 or c1 <= c0:
            return
        u8 = rows[:, :n, c0 - x0:c1 - x0].round().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
        out[top:top + n, c0:c1] = u8.cpu().numpy()

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
    """A TiledInference for a `generator.safetensors` file (no loss networks, no pretrained downloads), or for a
    BasicSR / Real-ESRGAN / OpenModelDB file of an rrdb or compact model (`srgan.basicsr`: upscaled by its own
    scale); `compile`: torch.compile the generator, tiles of one shape (see the module docstring)."""
    from srgan.basicsr import is_crappify_file, load_start_generator
    from srgan.checkpoint import load_generator, read_generator_meta

    if Path(path).is_file() and not is_crappify_file(Path(path)):
        model = load_start_generator(path, device).eval()  # or the reason it is neither kind of file
        options.setdefault("data_scale", model.crappify_spec["scale"])
        return TiledInference(model, device=device, normalizer=Normalizer(), compile=compile, **options)
    meta = read_generator_meta(path)
    stats = meta.get("normalization")
    normalizer = Normalizer(tuple(stats)) if stats else Normalizer()
    options.setdefault("data_scale", int(meta["extra"].get("data_scale") or 1))
    return TiledInference(load_generator(path, device), device=device, normalizer=normalizer, compile=compile,
                          **options)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_index(n: int, start: int, stop: int) -> np.ndarray:
    """Indices start..stop-1 into 0..n-1 padded at the end by reflection, as `np.pad(mode="reflect")` pads (edge
    replication for a 1-px side, where reflection is undefined): padding an image along an axis is indexing it
    with these. Computed for just the range asked for, so a tile's indices never cost the whole axis."""
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx %= period
    return np.where(idx < n, idx, period - idx)


@dataclass
class _Grid:
    """The tiles of one image: its size (h, w) padded to (hp, wp), tiles th×tw at origins ys×xs, model scale."""

    h: int
    w: int
    hp: int
    wp: int
    th: int
    tw: int
    scale: int
    ys: list[int]
    xs: list[int]

    def rows(self, y: int, n: int) -> np.ndarray:
        return _pad_index(self.h, y, y + n)

    def cols(self, x: int, n: int) -> np.ndarray:
        return _pad_index(self.w, x, x + n)


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
