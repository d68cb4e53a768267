"""Stand-ins of the real datasets: their folder layout, file format and image geometry, filled with the photos that
installed packages ship (`crappify.sources.sample_photos`), so a recipe can be rehearsed (`crappify run
--rehearse`) and tested where its real data is not. Toy-sized photos hide what the real ones meet: a `size`
larger than CelebA's short side builds nothing at all.

`STANDINS` maps a layout name to how to make it and what the real dataset holds (its photo count, used for time
estimates). A pipeline names its layout with `standin:`; by default its source's (`celeba`, `flickr30k`,
`celeba-hq`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from crappify.errors import CrappifyError
from crappify.sources import sample_photos


def photo(index: int, width: int, height: int) -> np.ndarray:
    """The index-th (cyclically) sample photo, centre-cropped to width:height and resized to it (BGR)."""
    photos = sample_photos()
    if not photos:
        raise CrappifyError("stand-in data needs the photos scikit-image / scikit-learn / matplotlib ship")
    img = cv2.imread(str(photos[index % len(photos)][1]), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    cw, ch = (w, round(w * height / width)) if w * height <= h * width else (round(h * width / height), h)
    img = img[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    if index >= len(photos):  # later rounds: mirrored, so repeated photos are not identical files
        img = img[:, ::-1] if (index // len(photos)) % 2 else img[::-1]
    shrink = width < cw
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def write(path: Path, img: np.ndarray) -> None:
    """A JPEG (quality 95) or PNG (fast compression) by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, data = cv2.imencode(path.suffix, img, params)
    if not ok:
        raise CrappifyError(f"cannot encode {path}")
    path.write_bytes(data.tobytes())


def celeba(root: Path, n: int = 9) -> None:
    """img_align_celeba/NNNNNN.jpg (178x218) and list_eval_partition.txt ('NNNNNN.jpg P', P 0/1/2 = train/valid/
    test), numbered as in the real set (valid from 162771, test from 182638): n photos, at least 2 valid and
    2 test, the rest train."""
    held = max(2, n // 20)
    ids = ([(1 + i, 0) for i in range(max(1, n - 2 * held))] + [(162771 + i, 1) for i in range(held)]
           + [(182638 + i, 2) for i in range(held)])
    for i, (number, _) in enumerate(ids):
        write(root / "img_align_celeba" / f"{number:06d}.jpg", photo(i, 178, 218))
    (root / "list_eval_partition.txt").write_text("".join(f"{number:06d}.jpg {p}\n" for number, p in ids))


def flickr30k(root: Path, n: int = 6) -> None:
    """flickr30k_images/<number>.jpg, 500x375 and (every third) 375x500, and results.csv ('image_name|
    comment_number| comment', five captions a photo)."""
    lines = ["image_name| comment_number| comment"]
    for i in range(n):
        name = f"{1000092795 + i * 7919}.jpg"
        write(root / "flickr30k_images" / name, photo(i, *((500, 375) if i % 3 else (375, 500))))
        lines += [f"{name}| 0| A photo number {i} ."] + [f"{name}| {k}| Another caption ." for k in range(1, 5)]
    (root / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def celeba_hq(root: Path, n: int = 6) -> None:
    """CelebAMask-HQ's CelebA-HQ-img/<n>.jpg, 1024x1024."""
    for i in range(n):
        write(root / "CelebA-HQ-img" / f"{i}.jpg", photo(i, 1024, 1024))


def df2k(root: Path, n: int = 6) -> None:
    """DIV2K/Flickr2K-sized PNGs: 2040x1356, the third one 1356x2040."""
    for i in range(n):
        write(root / f"{801 + i:04d}.png", photo(i, *((1356, 2040) if i % 6 == 2 else (2040, 1356))))


def coco(root: Path, n: int = 6) -> None:
    """MS COCO train2014-sized JPEGs: 640x480, every third one 480x640."""
    for i in range(n):
        write(root / f"COCO_train2014_{9 + i * 25:012d}.jpg", photo(i, *((480, 640) if i % 3 == 1 else (640, 480))))


@dataclass(frozen=True)
class StandIn:
    make: Callable[..., None]  # make(root, n): n photos in the layout
    photos: int  # how many photos the real dataset has
    what: str


STANDINS: dict[str, StandIn] = {
    "celeba": StandIn(celeba, 202_599, "CelebA aligned (178x218 JPEGs, list_eval_partition.txt)"),
    "flickr30k": StandIn(flickr30k, 31_783, "Flickr30k (500x375 / 375x500 JPEGs, results.csv)"),
    "celeba-hq": StandIn(celeba_hq, 30_000, "CelebA-HQ (1024x1024)"),
    "df2k": StandIn(df2k, 3_450, "DF2K: DIV2K + Flickr2K (2040x1356 PNGs)"),
    "coco": StandIn(coco, 82_783, "MS COCO train2014 (640x480 JPEGs)"),
}


def make_standin(name: str, root: str | Path, n: int) -> Path:
    """Fill `root` with `n` photos in the layout `name` (one of STANDINS); returns root."""
    if name not in STANDINS:
        raise CrappifyError(f"unknown stand-in layout {name!r}; valid: {', '.join(STANDINS)}")
    root = Path(root)
    STANDINS[name].make(root, n)
    return root
