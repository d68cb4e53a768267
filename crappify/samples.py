"""Many training photos from the few that installed packages ship: seeded crops, split by photo.

The embedded demo has eleven real photos (scikit-image, scikit-learn, matplotlib). Training on eleven
images teaches nothing, so `cut_sample_crops` cuts each into many square crops at random positions and
zoom levels (with flips) and writes them as a `folder` source with `train/`, `valid/` and `test/`
sub-folders. The split is by photo, never by crop: the held-out crops come from photos the model never
saw, so the evaluation is honest. Crops are PNG (lossless: the only degradation is the preset's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crappify.errors import ConfigError
from crappify.imageio import decode, save_image_atomic
from crappify.sources import sample_id, sample_photos

# Held-out photos (by sample name): varied content, none of them in the training crops.
HELD_OUT = {"valid": ("skimage/coffee.png",), "test": ("skimage/chelsea.png", "sklearn/china.jpg")}


@dataclass(frozen=True)
class CropPlan:
    """How many crops of which size per split, and the zoom range (1 = the photo's own pixels)."""

    size: int = 128
    train: int = 320
    valid: int = 16
    test: int = 32
    zoom: tuple[float, float] = (0.5, 1.0)
    seed: int = 0


def random_crop(img: np.ndarray, size: int, zoom: float, flip: bool, rng: np.random.Generator) -> np.ndarray:
    """A size×size crop of `img` shrunk by `zoom` (area interpolation), at a random position."""
    h, w = img.shape[:2]
    zoom = max(zoom, size / min(h, w))  # never upscale: a crop must fit in the (shrunk) photo
    if zoom < 1.0:
        img = cv2.resize(img, (max(size, round(w * zoom)), max(size, round(h * zoom))), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = img[y:y + size, x:x + size]
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def cut_sample_crops(out: str | Path, plan: CropPlan) -> dict[str, int]:
    """Write `out/<split>/<photo>-<n>.png` crops of the sample photos; returns crops per split.

    Deterministic for a plan; files that already exist are kept (a re-run after a kill finishes the set).
    """
    out = Path(out)
    photos = dict(sample_photos())
    if not photos:
        raise ConfigError("no sample photos found: install scikit-image, scikit-learn or matplotlib")
    groups = {split: [n for n in names if n in photos] for split, names in HELD_OUT.items()}
    held = {n for names in groups.values() for n in names}
    groups["train"] = sorted(n for n in photos if n not in held)
    counts = {}
    for split in ("train", "valid", "test"):
        names, n_crops = groups[split], getattr(plan, split)
        if n_crops and not names:
            raise ConfigError(f"no sample photos available for the {split} split")
        pixels = {n: decode(photos[n]) for n in names}
        for name in names:
            if min(pixels[name].shape[:2]) < plan.size:
                raise ConfigError(f"crop size {plan.size} is larger than sample photo {name}")
        for k in range(n_crops):
            name = names[k % len(names)]
            dst = out / split / f"{sample_id(name)}-{k:04d}.png"
            if dst.is_file():
                continue
            rng = np.random.default_rng([plan.seed, k, *sample_id(name).encode()])
            zoom = float(rng.uniform(*plan.zoom))
            crop = random_crop(pixels[name], plan.size, zoom, bool(rng.random() < 0.5), rng)
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(dst, crop)
        counts[split] = n_crops
    return counts
