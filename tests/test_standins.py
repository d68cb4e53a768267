"""Every shipped real-size pipeline builds a non-empty dataset, every split included, from a stand-in of its real
source: the real layout, file format and image geometry (CelebA's 178x218 JPEGs with the official partition file,
Flickr30k's 500x375 / 375x500 JPEGs with results.csv, CelebA-HQ's 1024x1024, DF2K-sized PNGs, COCO-sized JPEGs),
made of the photos installed packages ship (`crappify.standins`). Toy-sized photos hide what the real ones meet:
a `size` larger than CelebA's short side builds nothing at all. Only the build-dataset stage runs, through
`run_pipeline`."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from crappify.standins import celeba, celeba_hq, coco, df2k, flickr30k
from srgan.pipeline import PIPELINES_DIR, load_pipeline, run_pipeline

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
