"""build-dataset `square: N` (`--square N`): every HR squashed to exactly N×N (bicubic, aspect not kept, upscaled
where the photo is smaller), as PyTorch-GAN's `Resize((N, N), BICUBIC)`; recorded in config.yaml only when set, so
every build without it keeps its bytes and `crappify run` stage hash; resumes, shards and merges like any build;
refused together with `size`."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from crappify.builder import (
    JOURNAL,
    BuildConfig,
    build_dataset,
    config_text,
    versions,
)
from crappify.chain import load_preset
from crappify.config import resolve
from crappify.errors import ConfigError, CrappifyError
from crappify.functional import resize
from crappify.imageio import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Photo, decode
from crappify.merge import merge_datasets

SQUARE = {"preset": "srgan-x4", "square": 256, "split": (0.5, 0.25, 0.25), "workers": 1}


def build(src: Path, out: Path, **kw):
    return build_dataset(BuildConfig(src=str(src), out=str(out), **{**SQUARE, **kw}), progress=False)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def src(photo_dir, big_photo_dir, tmp_path_factory) -> Path:
    """Photos smaller than 256 px on both sides (80-160 px, as CelebA's 178x218 is smaller than the port's 256)
    and larger ones (short side 240-300, long 330-420: one side up, the other down)."""
    root = tmp_path_factory.mktemp("square-src")
    for i, photo in enumerate(sorted([*photo_dir.rglob("*.*"), *big_photo_dir.rglob("*.*")])):
        shutil.copy(photo, root / f"p{i:02d}{photo.suffix}")
    return root


@pytest.fixture(scope="module")
def squared(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("square") / "whole"
    build(src, out)
    return out


def test_every_hr_is_exactly_n_by_n_bicubic_and_written_not_linked(src, squared):
    manifest = rows(squared / "manifest.csv")
    assert len(manifest) == len(list(src.iterdir())) and rows(squared / "skipped.csv") == []  # none too small
    assert {(r["hr_width"], r["hr_height"], r["lr_width"], r["lr_height"]) for r in manifest} == {
        ("256", "256", "64", "64")}
    assert {r["split"] for r in manifest} == {"train", "valid", "test"}
    for row in manifest:
        source, hr = src / row["source"], squared / row["hr"]
        assert hr.suffix == ".png" and not os.path.samefile(source, hr)
        with Photo(source) as photo:
            expected = resize(photo.pixels()[0], 256, 256, "bicubic")
        assert (decode(hr) == expected).all(), row["id"]
        assert decode(squared / row["lr"]).shape == (64, 64, 3)


def test_the_square_is_cropped_to_a_multiple_of_the_scale(tmp_path):
    res = build("samples", tmp_path / "out", square=250, limit=2)
    assert res.built == 2
    assert {(r["hr_width"], r["hr_height"], r["lr_width"], r["lr_height"]) for r in rows(res.out / "manifest.csv")} \
        == {("248", "248", "62", "62")}


def test_config_yaml_records_square_and_without_it_keeps_its_old_bytes_and_stage_hash(squared, tmp_path):
    from srgan.pipeline import stage_hash

    config = yaml.safe_load((squared / "config.yaml").read_text())
    assert config["square"] == 256 and config["size"] is None
    assert list(config)[3:6] == ["size", "square", "scale"]
    assert BuildConfig(src="s", out="o", square=256).model_dump()["square"] == 256

    # unset: config.yaml holds exactly the keys (and order) it had before the option existed
    build_dataset(BuildConfig(src="samples", out=str(tmp_path / "plain"), preset="srgan-x4", size=64, limit=3,
                              workers=1), progress=False)
    old = {"src": "samples", "source": "samples", "preset": load_preset("srgan-x4").to_dict(), "size": 64,
           "scale": 4, "seed": 0, "limit": 3, "split": [0.9, 0.05, 0.05], "max_pixels": DEFAULT_MAX_PIXELS,
           "max_bytes": DEFAULT_MAX_BYTES, "hr_format": "png", "versions": versions()}
    assert (tmp_path / "plain" / "config.yaml").read_text(encoding="utf-8") == config_text(old)
    cfg = BuildConfig(src="samples", out="x", preset="srgan-x4", size=64, workers=1)
    assert "square" not in cfg.model_dump()
    # the stage hash leaves it out unset (as any option at its default), and takes it in when set
    explicit = cfg.model_copy(update={"square": None})
    assert stage_hash("build-dataset", cfg, "") == stage_hash("build-dataset", explicit, "")
    squared_cfg = cfg.model_copy(update={"square": 64})
    assert stage_hash("build-dataset", cfg, "") != stage_hash("build-dataset", squared_cfg, "")


def test_square_and_size_together_are_a_one_line_config_error(src, tmp_path, cli):
    with pytest.raises(ConfigError, match="mutually exclusive") as exc:
        resolve(BuildConfig, src=str(src), out=str(tmp_path / "x"), size=128, square=256)
    assert "\n" not in str(exc.value) and "square" in str(exc.value)
    res = cli("build-dataset", src, tmp_path / "out", "--size", "128", "--square", "256", "--quiet")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and "mutually exclusive" in res.stderr
    assert not (tmp_path / "out").exists()
    res = cli("build-dataset", "samples", tmp_path / "ok", "--preset", "srgan-x4", "--square", "64", "--limit", "2",
              "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())["square"] == 64


def test_a_square_build_resumes_to_the_same_bytes_and_another_geometry_is_refused(src, squared, tmp_path, read_tree):
    out = tmp_path / "out"
    shutil.copytree(squared, out)
    # what a killed build leaves: the journal of the first half, no tables, the second half's files gone
    manifest = rows(out / "manifest.csv")
    half = len(manifest) // 2
    (out / JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in manifest[:half]))
    for name in ("manifest.csv", "skipped.csv"):
        (out / name).unlink()
    for r in manifest[half:]:
        (out / r["hr"]).unlink()
        (out / r["lr"]).unlink()
    res = build(src, out)
    assert res.reused == half and res.built == len(manifest)
    assert read_tree(out) == read_tree(squared)

    with pytest.raises(CrappifyError, match="differs in: square"):
        build(src, out, square=128)
    with pytest.raises(CrappifyError, match="differs in: size, square"):
        build(src, out, square=None, size=64)
    plain = tmp_path / "plain"  # a dataset built without the option (as every older one) is not resumed with it
    build(src, plain, square=None)
    with pytest.raises(CrappifyError, match=r"differs in: square\)"):
        build(src, plain, square=64)


def test_square_parts_merge_to_the_single_build(src, squared, tmp_path, read_tree):
    parts = [tmp_path / f"part{k}" for k in (1, 2)]
    for k, part in enumerate(parts, 1):
        build(src, part, shard=f"{k}/2")
        assert yaml.safe_load((part / "config.yaml").read_text())["square"] == 256
    merge_datasets(parts, tmp_path / "merged")
    assert read_tree(tmp_path / "merged") == read_tree(squared)
