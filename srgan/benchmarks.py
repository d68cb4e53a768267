"""Benchmark folders the way super-resolution papers use them (BasicSR / traiNNer-redux layouts), for `evaluate`.

Two layouts:

- a folder of HR images and a scale (`--hr DIR --scale S`, e.g. Set5's `GTmod12` or its original HR): each HR
  is cropped at the bottom and right to a multiple of S (BasicSR's `mod_crop`) and its LR made from that with
  MATLAB `imresize`'s bicubic (`srgan.upsample.resize_image`, the kernel of the bicubic baseline too);
- paired folders (`--hr DIR --lr DIR`, e.g. `GTmod12` / `LRbicx4`) matched by file stem: `baby.png` goes with
  `baby.png` or `babyx4.png` (an exact stem first). S comes from the sizes: a whole number, the same for every
  pair; an HR up to S-1 px larger than S × its LR is cropped to it, as BasicSR's paired test set does.

Metrics on these follow BasicSR's `calculate_psnr` / `calculate_ssim` with `test_y_channel=True` and
`crop_border=S`; `srgan.metrics.ssim_valid` is its SSIM (the window only where it fits), which torchmetrics'
differs from.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crappify.errors import ConfigError
from crappify.imageio import IMAGE_EXTENSIONS, ImageError, Photo, is_temp_name

# folder names that say which half of a layout a folder is, not which benchmark: the report names the parent
GENERIC_NAMES = re.compile(r"(?i)(gt|hr|lr|original|gtmod\d+|hrmod\d+|lrbicx\d+|x\d+|lr_?bicubic)")


@dataclass
class Item:
    """One pair to measure: `load()` gives its (LR, HR) as uint8 RGB, or raises ImageError naming the file."""

    id: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass
class TestSet:
    """What `evaluate` measures on: a split of a built dataset, or a benchmark folder (`benchmark_test_set`)."""

    name: str  # the report's title: the dataset's path, or the benchmark's name (Set5)
    split: str  # the dataset's split; "benchmark" for a folder
    items: list[Item]
    scale: int | None  # the border cropped; None: each pair's HR/LR ratio
    params: dict[str, Any] = field(default_factory=dict)  # the builder's params by id (psnr_occ); none for a folder
    benchmark: bool = False


@dataclass(frozen=True)
class BenchPair:
    """One benchmark image: its HR file and, for paired folders, its LR file."""

    id: str
    hr: Path
    lr: Path | None = None


def benchmark_name(hr_dir: str | Path) -> str:
    """How the report names a benchmark: its folder's name, or the parent's where the folder is only a layout's
    half (`Set5/GTmod12` → `Set5`)."""
    path = Path(hr_dir).resolve()
    return path.parent.name if GENERIC_NAMES.fullmatch(path.name) and path.parent.name else path.name


def list_images(folder: str | Path, what: str) -> list[Path]:
    """The image files directly inside `folder` (sorted; our temporaries and hidden files left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not p.name.startswith(".") and not is_temp_name(p.name))
    if not files:
        raise ConfigError(f"{folder}: no images in this {what} folder ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise ConfigError(f"{p}: two {what} images named {p.stem!r} ({stems[p.stem].name}, {p.name})")
        stems[p.stem] = p
    return files


def match_lr(hr_files: list[Path], lr_dir: str | Path) -> list[BenchPair]:
    """Each HR with its LR in `lr_dir`, by stem: the same stem, else the stem followed by `x<N>` (`babyx4`)."""
    by_stem = {p.stem: p for p in list_images(lr_dir, "LR")}
    pairs = []
    for hr in hr_files:
        lr = by_stem.get(hr.stem)
        if lr is None:
            suffixed = [p for s, p in by_stem.items() if re.fullmatch(re.escape(hr.stem) + r"x\d+", s)]
            if len(suffixed) > 1:
                raise ConfigError(f"{hr}: several LR images could be its own: {', '.join(p.name for p in suffixed)}")
            if not suffixed:
                raise ConfigError(f"{hr}: no LR image for it in {lr_dir} (looked for {hr.stem}.* and "
                                  f"{hr.stem}x<scale>.*)")
            lr = suffixed[0]
        pairs.append(BenchPair(hr.stem, hr, lr))
    return pairs


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, upright, from its header."""
    with Photo(path) as photo:
        return photo.size


def pair_scale(hr_size: tuple[int, int], lr_size: tuple[int, int]) -> int | None:
    """The whole-number S with HR = S × LR (each side up to S-1 px more, which the mod-crop takes off), or None."""
    (w, h), (lw, lh) = hr_size, lr_size
    s = w // lw
    if s < 1 or h // lh != s or w - s * lw >= s or h - s * lh >= s:
        return None
    return s


def infer_scale(pairs: list[BenchPair], given: int | None = None) -> int:
    """The scale of paired folders, from the header sizes of every pair: one line naming the pair where it is not a
    whole number, differs from the first pair's, or from `given` (`--scale`). Unreadable pairs are left to the
    evaluation, which skips them with one line each."""
    scale, first = given, None
    for pair in pairs:
        assert pair.lr is not None
        try:
            hr_size, lr_size = image_size(pair.hr), image_size(pair.lr)
        except ImageError:
            continue
        s = pair_scale(hr_size, lr_size)
        if s is None:
            raise ConfigError(f"{pair.hr}: HR {hr_size[0]}x{hr_size[1]} is not a whole-number multiple of its LR "
                              f"{pair.lr.name} ({lr_size[0]}x{lr_size[1]})")
        if scale is not None and s != scale:
            was = f"--scale {scale}" if first is None else f"{first.name}'s x{scale}"
            raise ConfigError(f"{pair.hr}: scale x{s} (LR {pair.lr.name}) differs from {was}; every pair of a "
                              "benchmark must have the same scale")
        scale, first = s, first or pair.hr
    if scale is None:
        raise ConfigError(f"{pairs[0].hr.parent}: none of its {len(pairs)} images could be read with its LR")
    return scale


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """`img` cropped at the bottom and right to a multiple of `scale` on each side (BasicSR's `mod_crop`)."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def load_pair(pair: BenchPair, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) of one benchmark image as uint8 RGB: the HR mod-cropped to `scale`; the LR read (paired folders) or
    made from it by MATLAB's bicubic (`resize_image`). Unreadable files raise `ImageError` naming the file."""
    from srgan.data import read_image
    from srgan.upsample import resize_image

    hr = mod_crop(read_image(pair.hr), scale)
    h, w = hr.shape[:2]
    if h < scale or w < scale:
        raise ImageError(f"{pair.hr}: smaller than the scale x{scale}")
    if pair.lr is None:
        return resize_image(hr, (w // scale, h // scale)), hr
    lr = read_image(pair.lr)
    if lr.shape[:2] != (h // scale, w // scale):
        raise ImageError(f"{pair.lr}: {lr.shape[1]}x{lr.shape[0]}, not its HR's {w}x{h} / {scale}")
    return lr, hr


def benchmark_test_set(hr: str, lr: str | None, scale: int | None, limit: int | None = None) -> TestSet:
    """The images of the benchmark folder `hr` (the first `limit` by name), with their LR read from `lr` or made
    by bicubic at `scale`; the scale of paired folders inferred from the sizes (and checked against `scale`)."""
    hr_files = list_images(hr, "HR")
    hr_files = hr_files[:limit] if limit else hr_files
    if lr is not None:
        pairs = match_lr(hr_files, lr)
        scale = infer_scale(pairs, scale)
    elif scale is None:
        raise ConfigError(f"{hr}: a benchmark folder needs its scale (--scale S) or its LR images (--lr DIR)")
    else:
        pairs = [BenchPair(p.stem, p) for p in hr_files]
    items = [Item(p.id, functools.partial(load_pair, p, scale)) for p in pairs]
    return TestSet(benchmark_name(hr), "benchmark", items, scale, benchmark=True)
