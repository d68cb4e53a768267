"""Sample crops for the demo: deterministic, split by photo, and folders with split sub-folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crappify.errors import ConfigError
from crappify.samples import HELD_OUT, CropPlan, cut_sample_crops, random_crop
from crappify.sources import list_source, sample_id


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_crops_are_deterministic_split_by_photo_and_resumable(tmp_path):
    plan = CropPlan(size=48, train=10, valid=3, test=4, seed=5)
    assert cut_sample_crops(tmp_path / "a", plan) == {"train": 10, "valid": 3, "test": 4}
    cut_sample_crops(tmp_path / "b", plan)
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b") and len(a) == 17
    held = {sample_id(n) for names in HELD_OUT.values() for n in names}
    train_photos = {Path(k).stem.rsplit("-", 1)[0] for k in a if k.startswith("train/")}
    assert train_photos and not train_photos & held  # no held-out photo is cut for training
    assert {Path(k).stem.rsplit("-", 1)[0] for k in a if k.startswith("test/")} <= held
    victim = tmp_path / "a" / next(iter(a))
    victim.unlink()
    cut_sample_crops(tmp_path / "a", plan)  # a re-run finishes the set
    assert files(tmp_path / "a") == a
    cut_sample_crops(tmp_path / "c", CropPlan(size=48, train=10, valid=3, test=4, seed=6))
    assert files(tmp_path / "c") != a  # another seed, other crops


def test_random_crop_never_upscales():
    img = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    rng = np.random.default_rng(0)
    crop = random_crop(img, 50, zoom=0.1, flip=False, rng=rng)
    assert crop.shape == (50, 50, 3)
    with pytest.raises(ConfigError, match="larger than sample photo"):
        cut_sample_crops("unused", CropPlan(size=4000))


def test_folder_with_split_subfolders_keeps_that_split(tmp_path, photo_maker):
    from conftest import save

    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for i in range(n):
            save(photo_maker(i), tmp_path / split / f"img{i}.png")
    save(photo_maker(0), tmp_path / "loose.png")
    kind, listing = list_source(tmp_path)
    assert kind == "folder" and listing.official_split
    assert sorted((it.split, it.id) for it in listing.items) == [
        ("test", "test/img0"), ("train", "train/img0"), ("train", "train/img1"), ("train", "train/img2"),
        ("valid", "val/img0"), ("valid", "val/img1")]
    assert ("loose.png", "outside the train/valid/test folders") in listing.skipped
