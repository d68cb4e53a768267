"""Preview grids: the original, the image after each op of a preset, and the final LR, side by side."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from crappify.builder import effective_scale, hr_geometry, item_seed, make_hr
from crappify.chain import Chain, load_preset
from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import ImageError, decode, save_image_atomic

LABEL_HEIGHT = 18
PAD = 4


def _tile(img: np.ndarray, label: str, height: int) -> np.ndarray:
    """Scale `img` to `height` (nearest-neighbour when enlarging, so LR pixels stay visible) under a label."""
    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    interp = cv2.INTER_NEAREST if height > h else cv2.INTER_AREA
    body = cv2.resize(img, (width, height), interpolation=interp)
    band = np.zeros((LABEL_HEIGHT, width, 3), np.uint8)
    text = label
    while text and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.38, 1)[0][0] > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    cv2.putText(band, text.replace("…", "~"), (2, LABEL_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([band, body])


def grid(tiles: list[tuple[str, np.ndarray]], height: int = 256, columns: int = 4) -> np.ndarray:
    """Lay labelled images out in rows of `columns`, each scaled to `height` px."""
    made = [_tile(img, label, height) for label, img in tiles]
    cell_w = max(t.shape[1] for t in made)
    rows = math.ceil(len(made) / columns)
    cols = min(columns, len(made))
    out = np.full((rows * (height + LABEL_HEIGHT + PAD) + PAD, cols * (cell_w + PAD) + PAD, 3), 32, np.uint8)
    for i, t in enumerate(made):
        r, c = divmod(i, columns)
        y, x = PAD + r * (height + LABEL_HEIGHT + PAD), PAD + c * (cell_w + PAD)
        out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def preview(img: np.ndarray, chain: Chain, seed: int = 0, size: int | None = None, scale: int | None = None,
            item_id: str = "preview", height: int = 256, columns: int = 4) -> np.ndarray:
    """A grid of the HR (prepared as `build-dataset` would), the image after each op, and the final LR.

    The item seed is derived from `seed` and `item_id` exactly as the builder does, so previewing a
    dataset item with its id shows the LR that was built for it.
    """
    scale = effective_scale(chain, scale)
    h, w = img.shape[:2]
    rw, rh, cw, ch = hr_geometry(w, h, size, scale)
    hr = make_hr(img, rw, rh, cw, ch)
    lr_size = (cw // scale, ch // scale) if scale else None
    trace: list[tuple[str, np.ndarray]] = []
    result = chain.run(hr, np.random.default_rng(item_seed(seed, item_id)), lr_size, trace=trace)
    lr = result.image
    tiles = [(f"HR {cw}x{ch}", hr)]
    tiles += [(f"{i + 1}. {label}", step_img) for i, (label, step_img) in enumerate(trace)]
    tiles.append((f"final LR {lr.shape[1]}x{lr.shape[0]}", lr))
    return grid(tiles, height=min(height, hr.shape[0]), columns=columns)


def preview_file(image: str | Path, preset: str, output: str | Path, seed: int = 0, size: int | None = None,
                 scale: int | None = None, item_id: str = "preview", height: int = 256) -> Path:
    """`crappify preview`: read `image`, write its preview grid for `preset` to `output` (.png or .jpg)."""
    if not Path(image).is_file():
        raise CrappifyError(f"image not found: {image}")
    chain = load_preset(preset)
    try:
        img = decode(image)
    except ImageError as exc:
        raise CrappifyError(f"cannot read {image}: {exc}") from None
    if size is not None and min(img.shape[:2]) < size:
        raise CrappifyError(f"{image} is smaller than --size {size} ({img.shape[1]}x{img.shape[0]})")
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--output must end in .png or .jpg, got {output}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(out, preview(img, chain, seed, size, scale, item_id, height))
    return out
