"""Every shipped real-size pipeline builds a non-empty dataset, every split included, from a stand-in of its real
source: the real layout, file format and image geometry (CelebA's 178x218 JPEGs with the official partition file,
Flickr30k's 500x375 / 375x500 JPEGs with results.csv, CelebA-HQ's 1024x1024, DF2K-sized PNGs, COCO-sized JPEGs),
made of the photos installed packages ship. Toy-sized photos hide what the real ones meet: a `size` larger than
CelebA's short side builds nothing at all. Only the build-dataset stage runs, through `run_pipeline`."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from crappify.sources import sample_photos
from srgan.pipeline import PIPELINES_DIR, load_pipeline, run_pipeline


def _photo(index: int, width: int, height: int) -> np.ndarray:
    """The index-th (cyclically) sample photo, centre-cropped to width:height and resized to it (BGR)."""
    photos = sample_photos()
    assert len(photos) >= 3, "the stand-ins need the photos scikit-image / scikit-learn / matplotlib ship"
    img = cv2.imread(str(photos[index % len(photos)][1]), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    cw, ch = (w, round(w * height / width)) if w * height <= h * width else (round(h * width / height), h)
    img = img[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    shrink = width < cw
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, data = cv2.imencode(path.suffix, img, params)
    assert ok
    path.write_bytes(data.tobytes())


def celeba(root: Path) -> None:
    """img_align_celeba/NNNNNN.jpg (178x218) and list_eval_partition.txt ('NNNNNN.jpg P', P 0/1/2 = train/valid/
    test): 5 train, 2 valid, 2 test, numbered as in the real set (valid from 162771, test from 182638)."""
    ids = [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (162771, 1), (162772, 1), (182638, 2), (182639, 2)]
    for i, (n, _) in enumerate(ids):
        _write(root / "img_align_celeba" / f"{n:06d}.jpg", _photo(i, 178, 218))
    (root / "list_eval_partition.txt").write_text("".join(f"{n:06d}.jpg {p}\n" for n, p in ids))


def flickr30k(root: Path) -> None:
    """flickr30k_images/<number>.jpg, 500x375 and 375x500, and results.csv ('image_name| comment_number| comment');
    6 photos: the 0.9/0.05/0.05 split gives at least one to valid and to test from 3 photos on."""
    lines = ["image_name| comment_number| comment"]
    for i in range(6):
        name = f"{1000092795 + i * 7919}.jpg"
        _write(root / "flickr30k_images" / name, _photo(i, *((500, 375) if i % 3 else (375, 500))))
        lines += [f"{name}| 0| A photo number {i} ."] + [f"{name}| {k}| Another caption ." for k in range(1, 5)]
    (root / "results.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def celeba_hq(root: Path) -> None:
    """CelebAMask-HQ's CelebA-HQ-img/<n>.jpg, 1024x1024; 6 photos (a ratio split, as flickr30k)."""
    for i in range(6):
        _write(root / "CelebA-HQ-img" / f"{i}.jpg", _photo(i, 1024, 1024))


def df2k(root: Path) -> None:
    """DIV2K/Flickr2K-sized PNGs: 2040x1356, one 1356x2040; 6 of them (a ratio split, 0.95/0.025/0.025 gives
    valid and test one each from 3 photos on)."""
    for i in range(6):
        _write(root / f"{801 + i:04d}.png", _photo(i, *((1356, 2040) if i == 2 else (2040, 1356))))


def coco(root: Path) -> None:
    """MS COCO train2014-sized JPEGs: 640x480, two 480x640; 6 of them (a ratio split)."""
    for i in range(6):
        _write(root / f"COCO_train2014_{9 + i * 25:012d}.jpg", _photo(i, *((480, 640) if i % 3 == 1 else (640, 480))))


# pipeline -> (its stand-in, the HR size(s) it asks for from the stand-in's photos, before the crop to a multiple of
# the dataset's scale that every HR gets)
EXPECTED: dict[str, tuple[Callable[[Path], None], set[tuple[int, int]]]] = {
    "celeba-pytorch-gan": (celeba, {(256, 256)}),  # squashed to 256x256, as the port
    "celeba-wgan-gp": (celeba, {(128, 157)}),  # short side 128 of 178x218
    "celeba-hq-srgan-x4": (celeba_hq, {(512, 512)}),
    "flickr30k-lesson7": (flickr30k, {(341, 256), (256, 341)}),  # short side 256 of 500x375 / 375x500
    "flickr30k-unet-mse": (flickr30k, {(341, 256), (256, 341)}),
    "realesrgan-x4": (df2k, {(602, 400), (400, 602)}),  # short side 400 of 2040x1356
    "srgan-keras-vgg16-tv": (coco, {(341, 256), (256, 341)}),  # short side 256 of 640x480
}
FIXED_LR_SHORT_SIDE = {"lesson7-occlude": 96, "lesson7": 96}  # presets that resize to a fixed size, not by a scale
REAL_PIPELINES = sorted(p for p in PIPELINES_DIR.glob("*.yaml") if load_pipeline(p).sample_crops is None)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Callable[[Callable[[Path], None]], Path]:
    """`standin(make)`: the folder `make` fills, made once per module."""
    made: dict[str, Path] = {}

    def get(make: Callable[[Path], None]) -> Path:
        if make.__name__ not in made:
            root = tmp_path_factory.mktemp(f"standin-{make.__name__}")
            make(root)
            made[make.__name__] = root
        return made[make.__name__]

    return get


def test_every_real_pipeline_has_a_stand_in():
    assert {p.stem for p in REAL_PIPELINES} == set(EXPECTED)


@pytest.mark.parametrize("path", REAL_PIPELINES, ids=lambda p: p.stem)
def test_a_stand_in_of_the_real_source_builds_every_split_at_the_asked_geometry(path, standin, tmp_path):
    make, sizes = EXPECTED[path.stem]
    src = standin(make)
    p = load_pipeline(path, out=str(tmp_path / "run"))
    p.build_dataset.update(src=str(src), out=str(tmp_path / "dataset"), workers=1)
    steps = run_pipeline(p, stop="build-dataset", progress=False)
    assert [s.stage for s in steps] == ["build-dataset"]
    with open(tmp_path / "dataset" / "skipped.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == []  # every stand-in photo is usable at the real geometry
    with open(tmp_path / "dataset" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows} == {"train", "valid", "test"}, path.stem
    config = yaml.safe_load((tmp_path / "dataset" / "config.yaml").read_text())
    scale = config["scale"]
    hr_sizes = {(w - w % scale, h - h % scale) for w, h in sizes} if scale else sizes
    for row in rows:
        hr, lr = (int(row["hr_width"]), int(row["hr_height"])), (int(row["lr_width"]), int(row["lr_height"]))
        assert hr in hr_sizes, (row["id"], hr)
        if scale:
            assert lr == (hr[0] // scale, hr[1] // scale), (row["id"], lr)
        else:
            assert min(lr) == FIXED_LR_SHORT_SIDE[config["preset"]["name"]], (row["id"], lr)
        for kind, size in (("hr", hr), ("lr", lr)):
            with Image.open(tmp_path / "dataset" / row[kind]) as img:
                assert img.size == size, (row[kind], img.size)
