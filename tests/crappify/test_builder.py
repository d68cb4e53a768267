"""crappify.builder: the dataset layout, geometry, replayable params, odd inputs, determinism and resuming."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import crappify.functional as F
from crappify.builder import (
    JOURNAL,
    MANIFEST_COLUMNS,
    MARKER,
    BuildConfig,
    build_dataset,
    effective_scale,
    hr_geometry,
    item_seed,
    versions,
)
from crappify.chain import load_preset
from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import decode, is_temp_name

EXPECTED_COLUMNS = ["id", "split", "source", "hr", "lr", "seed", "hr_width", "hr_height", "lr_width",
                    "lr_height", "caption", "params"]


def build(src: Path, out: Path, overwrite: bool = False, **kw):
    kw.setdefault("workers", 1)
    return build_dataset(BuildConfig(src=str(src), out=str(out), **kw), overwrite=overwrite, progress=False)


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == EXPECTED_COLUMNS
        return list(reader)


def skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["source", "reason"]
        return {r["source"]: r["reason"] for r in reader}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def check_replay(out: Path, preset: str) -> int:
    """Every row's params, replayed on its HR file's pixels, give its LR file exactly; returns the row count."""
    chain = load_preset(preset)
    rows = manifest(out)
    for row in rows:
        record = json.loads(row["params"])
        assert image_size(out / row["hr"]) == (int(row["hr_width"]), int(row["hr_height"])), row["id"]
        # presets with shrink_on_decode ran on the HR decoded at 1/reduced (recorded in params)
        hr = decode(out / row["hr"], reduce=record.get("reduced"))
        lr_path = out / row["lr"]
        assert image_size(lr_path) == (int(row["lr_width"]), int(row["lr_height"])), row["id"]
        if lr_path.suffix == ".jpg":
            encoded = chain.replay(hr, record, decode=False).encoded
            assert encoded is not None, row["id"]
            assert encoded == lr_path.read_bytes(), f"{row['id']}: replayed JPEG bytes differ"
        else:
            assert lr_path.suffix == ".png"
            result = chain.replay(hr, record)
            assert result.encoded is None, f"{row['id']}: a JPEG-ending chain must give a .jpg LR"
            np.testing.assert_array_equal(decode(lr_path), result.image, err_msg=row["id"])
    return len(rows)


# --- small pure helpers -------------------------------------------------------------------------------


def test_item_seed_is_stable_and_depends_on_seed_and_id():
    s = item_seed(0, "a/b")
    assert s == item_seed(0, "a/b")
    assert s != item_seed(1, "a/b") and s != item_seed(0, "a/c")
    assert 0 <= s < 2**63


@pytest.mark.parametrize("w, h, size, scale, expected", [
    (160, 107, None, None, (160, 107, 160, 107)),
    (160, 107, None, 4, (160, 107, 160, 104)),
    (160, 107, 64, 4, (96, 64, 96, 64)),
    (107, 160, 64, 4, (64, 96, 64, 96)),
    (150, 100, 64, 4, (96, 64, 96, 64)),
    (157, 100, 64, 4, (100, 64, 100, 64)),
    (163, 100, 64, 4, (104, 64, 104, 64)),
    (166, 100, 64, 4, (106, 64, 104, 64)),
    (166, 100, 64, 3, (106, 64, 105, 63)),
])
def test_hr_geometry(w, h, size, scale, expected):
    assert hr_geometry(w, h, size, scale) == expected


def test_effective_scale():
    assert effective_scale(load_preset("srgan-x4"), None) == 4
    assert effective_scale(load_preset("srgan-x4"), 4) == 4
    assert effective_scale(load_preset("flickr30k-restore"), None) == 4
    assert effective_scale(load_preset("flickr30k-restore"), 2) == 2
    assert effective_scale(load_preset("lesson7"), None) is None
    with pytest.raises(ConfigError, match="--scale"):
        effective_scale(load_preset("lesson7"), 4)
    with pytest.raises(ConfigError, match="fixes scale 4"):
        effective_scale(load_preset("srgan-x4"), 2)


def test_build_config_rejects_bad_values():
    with pytest.raises(ValueError):
        BuildConfig(src="a", out="b", split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        BuildConfig(src="a", out="b", size=4)
    with pytest.raises(ValueError):
        BuildConfig(src="a", out="b", colour="red")


# --- layout, manifest, params -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srgan_out(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("srgan") / "out"
    res = build(photo_dir, out, preset="srgan-x4", size=64)
    return res, out


def test_layout_and_manifest(srgan_out, photo_dir):
    res, out = srgan_out
    n = len(list(photo_dir.rglob("*.*")))
    assert res.built == n and res.skipped == 0 and res.reused == 0
    assert sum(res.per_split.values()) == n
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.yaml", "hr", "lr", "manifest.csv",
                                                     "skipped.csv"]
    assert MANIFEST_COLUMNS == EXPECTED_COLUMNS
    rows = manifest(out)
    assert len(rows) == n
    assert len({r["id"] for r in rows}) == n
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        assert (photo_dir / r["source"]).is_file()
        assert r["id"] == Path(r["source"]).with_suffix("").as_posix()
        assert r["hr"] == f"hr/{r['split']}/{r['id']}.png"
        assert r["lr"] == f"lr/{r['split']}/{r['id']}.png"
        assert (out / r["hr"]).is_file() and (out / r["lr"]).is_file()
        assert int(r["seed"]) == item_seed(0, r["id"])
        assert r["caption"] == ""
        params = json.loads(r["params"])
        assert set(params) == {"vars", "steps"}
        assert params["steps"][0]["op"] == "resize" and params["steps"][0]["interpolation"] == "bicubic"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([MARKER, "config.yaml", "manifest.csv", "skipped.csv"] + [r["hr"] for r in rows]
                           + [r["lr"] for r in rows])
    assert skipped(out) == {}


def test_srgan_x4_geometry(srgan_out):
    _, out = srgan_out
    for r in manifest(out):
        hw, hh, lw, lh = (int(r[k]) for k in ("hr_width", "hr_height", "lr_width", "lr_height"))
        assert image_size(out / r["hr"]) == (hw, hh)
        assert image_size(out / r["lr"]) == (lw, lh)
        assert min(hw, hh) == 64
        assert hw % 4 == 0 and hh % 4 == 0
        assert (lw, lh) == (hw // 4, hh // 4)


def test_srgan_x4_replay(srgan_out):
    assert check_replay(srgan_out[1], "srgan-x4") > 0


def test_config_yaml(srgan_out, photo_dir):
    _, out = srgan_out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["preset"] == load_preset("srgan-x4").to_dict()
    assert cfg["preset"]["steps"] == [{"op": "resize", "size": "lr", "interpolation": "bicubic"}]
    assert cfg["src"] == str(photo_dir.resolve())
    assert cfg["source"] == "folder"
    assert (cfg["size"], cfg["scale"], cfg["seed"], cfg["limit"]) == (64, 4, 0, None)
    assert cfg["split"] == [0.9, 0.05, 0.05]
    assert cfg["hr_format"] == "png"
    assert "workers" not in cfg
    assert cfg["versions"] == versions()
    for lib in ("crappify", "python", "numpy", "opencv", "pillow", "albumentations"):
        assert cfg["versions"][lib]


def test_smaller_than_size_is_skipped_not_upscaled(photo_dir, tmp_path, photo_maker):
    src = shutil.copytree(photo_dir, tmp_path / "src")
    tiny = photo_maker(2, 60)  # 60 x 40
    Image.fromarray(tiny).save(src / "tiny.png")
    out = tmp_path / "out"
    res = build(src, out, preset="srgan-x4", size=100)
    reasons = skipped(out)
    assert "tiny.png" in reasons
    assert reasons["tiny.png"].startswith("smaller than --size 100")
    built = {r["source"] for r in manifest(out)}
    assert "tiny.png" not in built
    assert not list(out.rglob("tiny.*"))
    for source, reason in reasons.items():
        with Image.open(src / source) as img:
            assert min(img.size) < 100, source
        assert "smaller than --size" in reason
    for r in manifest(out):
        assert min(int(r["hr_width"]), int(r["hr_height"])) == 100
    assert res.built == len(built) and res.skipped == len(reasons)
    assert res.built > 0 and res.skipped >= 2


def test_lesson7_hr_is_a_byte_copy_when_nothing_changes(photo_dir, tmp_path):
    out = tmp_path / "out"
    res = build(photo_dir, out, preset="lesson7")
    rows = manifest(out)
    assert res.built == len(rows) > 0
    for r in rows:
        src = photo_dir / r["source"]
        assert Path(r["hr"]).suffix == src.suffix
        assert (out / r["hr"]).read_bytes() == src.read_bytes(), r["id"]
        assert (int(r["hr_width"]), int(r["hr_height"])) == image_size(src)
        assert r["lr"].endswith(".jpg")
        assert (out / r["lr"]).read_bytes()[:2] == b"\xff\xd8"
        assert min(int(r["lr_width"]), int(r["lr_height"])) == 96
        params = json.loads(r["params"])
        assert 10 <= params["vars"]["q"] <= 70
        assert params["steps"][-1]["op"] == "jpeg" and params["steps"][-1]["quality"] == params["vars"]["q"]
    assert check_replay(out, "lesson7") == len(rows)


@pytest.mark.parametrize("link_hr", [True, False])
def test_unchanged_hr_is_linked_or_copied(photo_dir, tmp_path, link_hr, read_tree):
    out = tmp_path / "out"
    build(photo_dir, out, preset="lesson7", link_hr=link_hr, limit=4)
    rows = manifest(out)
    assert len(rows) == 4
    for r in rows:
        src, hr = photo_dir / r["source"], out / r["hr"]
        assert hr.read_bytes() == src.read_bytes()
        assert os.path.samefile(src, hr) == link_hr
    assert "link_hr" not in yaml.safe_load((out / "config.yaml").read_text())


def test_lesson7_with_size(big_photo_dir, tmp_path):
    out = tmp_path / "out"
    res = build(big_photo_dir, out, preset="lesson7", size=192)
    rows = manifest(out)
    assert res.built == len(rows) == 4
    for r in rows:
        assert min(int(r["hr_width"]), int(r["hr_height"])) == 192
        assert min(int(r["lr_width"]), int(r["lr_height"])) == 96
        lr = (out / r["lr"]).read_bytes()
        assert r["lr"].endswith(".jpg") and lr[:2] == b"\xff\xd8" and lr[-2:] == b"\xff\xd9"
        assert r["hr"].endswith(".png")
    assert check_replay(out, "lesson7") == 4


def test_flickr30k_restore_replay_and_mixed_lr_formats(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, preset="flickr30k-restore", size=64, seed=5)
    rows = manifest(out)
    assert check_replay(out, "flickr30k-restore") == len(rows)
    for r in rows:
        steps = json.loads(r["params"])["steps"]
        assert [s["op"] for s in steps] == ["gaussian_blur", "resize", "jpeg", "occlude"]
        # the LR is the JPEG's own bytes exactly when the last applied op is the JPEG
        assert r["lr"].endswith(".jpg") == (steps[-1].get("applied") is False)
        assert (int(r["lr_width"]), int(r["lr_height"])) == (int(r["hr_width"]) // 4, int(r["hr_height"]) // 4)


def test_realistic_replay(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, preset="realistic", size=64, scale=2, limit=6)
    rows = manifest(out)
    assert len(rows) == 6
    assert check_replay(out, "realistic") == 6
    for r in rows:
        assert (int(r["lr_width"]), int(r["lr_height"])) == (int(r["hr_width"]) // 2, int(r["hr_height"]) // 2)


@pytest.mark.parametrize("preset", ["lesson7", "srgan-x4"])
def test_replay_from_byte_copied_large_jpeg_hr(big_photo_dir, tmp_path, preset):
    out = tmp_path / "out"
    build(big_photo_dir, out, preset=preset)
    copied = [r for r in manifest(out) if r["hr"].endswith(".jpg")
              and (out / r["hr"]).read_bytes() == (big_photo_dir / r["source"]).read_bytes()]
    assert copied, "the test needs an HR that is a byte copy of a large JPEG"
    check_replay(out, preset)
    reduced = [json.loads(r["params"]).get("reduced") for r in copied]
    if preset == "lesson7":  # shrink_on_decode: the chain ran on a DCT-reduced decode, and says so
        assert any(r and r > 1 for r in reduced), reduced
    else:  # srgan-x4 is exact: bicubic x4 of the HR's full pixels
        assert not any(reduced), reduced
        for r in copied:
            hr = decode(out / r["hr"])
            lr = decode(out / r["lr"])
            h, w = hr.shape[:2]
            np.testing.assert_array_equal(lr, F.resize(hr, w // 4, h // 4, "bicubic", True))


def test_resume_after_a_torn_journal_line(photo_dir, tmp_path, read_tree, monkeypatch):
    """A kill can cut the journal's last line short; the resumed run must not glue a record onto it."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    build(photo_dir, ref, preset="srgan-x4", size=64)
    build(photo_dir, out, preset="srgan-x4", size=64)
    rows = manifest(out)
    (out / "manifest.csv").unlink()
    (out / "skipped.csv").unlink()
    lines = [json.dumps(r) for r in rows[:2]]
    torn = "\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2]
    (out / ".journal.jsonl").write_text(torn)

    import crappify.builder as builder_module

    real, calls = builder_module.process_item, []

    def crash_on_second(item, job):  # a resumed run that dies after journaling one new item
        calls.append(item.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(item, job)

    monkeypatch.setattr(builder_module, "process_item", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build(photo_dir, out, preset="srgan-x4", size=64)
    journal = (out / ".journal.jsonl").read_text().splitlines()
    assert journal[:3] == [*lines, lines[-1][: len(lines[-1]) // 2]]
    assert json.loads(journal[3])["id"] == calls[0]  # the new record is on a line of its own
    monkeypatch.undo()

    res = build(photo_dir, out, preset="srgan-x4", size=64)
    assert res.reused == 3
    assert read_tree(out) == read_tree(ref)


def test_hr_format_jpg(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, preset="srgan-x4", size=64, hr_format="jpg", limit=4)
    rows = manifest(out)
    assert len(rows) == 4
    for r in rows:
        assert r["hr"].endswith(".jpg") and (out / r["hr"]).read_bytes()[:2] == b"\xff\xd8"
        assert image_size(out / r["hr"]) == (int(r["hr_width"]), int(r["hr_height"]))


def test_hr_format_jpg_replay(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, preset="srgan-x4", size=64, hr_format="jpg", limit=4)
    check_replay(out, "srgan-x4")


def test_limit(photo_dir, tmp_path):
    res = build(photo_dir, tmp_path / "out", preset="srgan-x4", size=64, limit=3)
    assert res.built == 3 and len(manifest(tmp_path / "out")) == 3


# --- odd and bad inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_out(odd_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("oddbuild") / "out"
    res = build(odd_files.root, out, preset="lesson7")
    return res, out


def test_odd_files_are_converted_and_bad_files_skipped(odd_files, odd_out):
    res, out = odd_out
    rows = {r["source"]: r for r in manifest(out)}
    converted = {p.relative_to(odd_files.root).as_posix(): kind for kind, p in odd_files.paths.items()}
    assert set(rows) == set(converted)
    assert res.built == len(converted)
    reasons = skipped(out)
    assert set(reasons) == set(odd_files.bad)
    for source, fragment in odd_files.bad.items():
        assert fragment in reasons[source], (source, reasons[source])
    assert res.skipped == len(odd_files.bad)
    for source, kind in converted.items():
        r = rows[source]
        hr = decode(out / r["hr"])
        assert r["hr"].endswith(".png"), kind  # converted, so re-encoded losslessly (never a byte copy)
        np.testing.assert_array_equal(hr, odd_files.expected[kind], err_msg=kind)
    assert check_replay(out, "lesson7") == len(converted)


def test_rgba_transparent_pixels_are_white_in_the_hr(odd_files, odd_out):
    _, out = odd_out
    r = next(r for r in manifest(out) if r["source"] == "rgba.png")
    hr = decode(out / r["hr"])
    assert (hr[:, : hr.shape[1] // 3] == 255).all()


def test_exif_rotated_hr_is_upright(odd_files, odd_out):
    _, out = odd_out
    r = next(r for r in manifest(out) if r["source"] == "rotated.jpg")
    with Image.open(odd_files.paths["exif6"]) as stored:
        sw, sh = stored.size
    assert (int(r["hr_width"]), int(r["hr_height"])) == (sh, sw)
    assert image_size(out / r["hr"]) == (sh, sw)
    lw, lh = int(r["lr_width"]), int(r["lr_height"])
    assert lw == 96 and lh > lw  # portrait LR from a landscape-stored JPEG
    np.testing.assert_array_equal(decode(out / r["hr"]), odd_files.expected["exif6"])


def test_sixteen_bit_values_in_the_hr(odd_out):
    _, out = odd_out
    rows = {r["source"]: r for r in manifest(out)}
    grey = decode(out / rows["grey16.png"]["hr"])
    assert tuple(grey[0, 0]) == (255, 255, 255) and tuple(grey[0, 1]) == (128, 128, 128)
    rgb = decode(out / rows["rgb16.png"]["hr"])
    assert tuple(rgb[0, 0]) == (255, 128, 0)


def test_decompression_bomb_is_skipped(photo_dir, tmp_path):
    limit = 13_000
    out = tmp_path / "out"
    res = build(photo_dir, out, preset="lesson7", max_pixels=limit)
    reasons = skipped(out)
    assert res.built > 0 and res.skipped > 0
    for source, reason in reasons.items():
        w, h = image_size(photo_dir / source)
        assert w * h > limit
        assert "decompression bomb" in reason
    for r in manifest(out):
        assert int(r["hr_width"]) * int(r["hr_height"]) <= limit


def test_only_bad_files_builds_nothing_but_writes_skipped(bad_only_dir, tmp_path):
    out = tmp_path / "out"
    res = build(bad_only_dir, out, preset="lesson7")
    assert res.built == 0 and res.skipped == 3
    assert manifest(out) == []
    assert set(skipped(out)) == {"empty.jpg", "text.jpg", "notes.txt"}


# --- determinism and resuming ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_dir(photo_dir, odd_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "src"
    shutil.copytree(photo_dir, root)
    shutil.copytree(odd_files.root, root / "odd")
    return root


def test_worker_count_does_not_change_a_byte(mixed_dir, tmp_path, read_tree):
    a, b = tmp_path / "w1", tmp_path / "w2"
    ra = build(mixed_dir, a, preset="flickr30k-restore", size=64, seed=3, workers=1)
    rb = build(mixed_dir, b, preset="flickr30k-restore", size=64, seed=3, workers=2)
    assert (ra.built, ra.skipped) == (rb.built, rb.skipped)
    assert ra.built > 10
    ta, tb = read_tree(a), read_tree(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], name


def test_seed_changes_the_lr_but_not_the_hr(photo_dir, tmp_path, read_tree):
    build(photo_dir, tmp_path / "s0", preset="flickr30k-restore", size=64, seed=0, split=(1.0, 0.0, 0.0))
    build(photo_dir, tmp_path / "s1", preset="flickr30k-restore", size=64, seed=1, split=(1.0, 0.0, 0.0))
    t0, t1 = read_tree(tmp_path / "s0"), read_tree(tmp_path / "s1")
    hr = [k for k in t0 if k.startswith("hr/")]
    assert hr and all(t0[k] == t1[k] for k in hr)
    lr0 = {k: v for k, v in t0.items() if k.startswith("lr/")}
    lr1 = {k: v for k, v in t1.items() if k.startswith("lr/")}
    assert lr0 != lr1


def test_second_run_reuses_everything(photo_dir, tmp_path, read_tree):
    out = tmp_path / "out"
    first = build(photo_dir, out, preset="lesson7", seed=2)
    before = read_tree(out)
    second = build(photo_dir, out, preset="lesson7", seed=2, workers=2)  # worker count is not part of the identity
    assert read_tree(out) == before
    assert first.reused == 0
    assert second.reused == second.built == first.built == len(manifest(out))
    assert not (out / JOURNAL).exists()


def test_second_run_keeps_the_tree_with_skipped_files(mixed_dir, tmp_path, read_tree):
    out = tmp_path / "out"
    first = build(mixed_dir, out, preset="lesson7", seed=2)
    before = read_tree(out)
    second = build(mixed_dir, out, preset="lesson7", seed=2, workers=2)
    assert read_tree(out) == before
    assert (second.built, second.skipped) == (first.built, first.skipped)
    assert second.reused >= first.built


def test_second_run_reuses_skipped_items_too(mixed_dir, tmp_path):
    out = tmp_path / "out"
    first = build(mixed_dir, out, preset="lesson7", seed=2)
    second = build(mixed_dir, out, preset="lesson7", seed=2)
    n_items = first.built + first.skipped - 1  # odd/notes.txt is skipped when listing, so it is no item
    assert second.reused == n_items


def test_resume_rebuilds_missing_files(photo_dir, tmp_path, read_tree):
    out = tmp_path / "out"
    first = build(photo_dir, out, preset="flickr30k-restore", size=64)
    before = read_tree(out)
    rows = manifest(out)
    (out / rows[0]["lr"]).unlink()
    (out / rows[1]["hr"]).unlink()
    again = build(photo_dir, out, preset="flickr30k-restore", size=64)
    assert again.reused == first.built - 2
    assert read_tree(out) == before


def test_different_config_needs_overwrite(photo_dir, tmp_path, read_tree):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build(photo_dir, out, preset="srgan-x4", size=64, seed=0)
    before = read_tree(out)
    with pytest.raises(CrappifyError, match="--overwrite") as info:
        build(photo_dir, out, preset="srgan-x4", size=64, seed=1)
    assert "seed" in str(info.value)
    assert read_tree(out) == before  # refused before touching anything
    with pytest.raises(CrappifyError, match="--overwrite"):
        build(photo_dir, out, preset="lesson7")
    res = build(photo_dir, out, overwrite=True, preset="srgan-x4", size=64, seed=1)
    assert res.reused == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    build(photo_dir, ref, preset="srgan-x4", size=64, seed=1)
    assert read_tree(out) == read_tree(ref)  # no stale file of the first build is left


def test_overwrite_with_a_smaller_dataset_leaves_no_stale_files(photo_dir, tmp_path, read_tree):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build(photo_dir, out, preset="lesson7", size=64)
    build(photo_dir, out, overwrite=True, preset="lesson7", size=64, limit=2)
    build(photo_dir, ref, preset="lesson7", size=64, limit=2)
    assert read_tree(out) == read_tree(ref)


def test_non_dataset_output_is_refused(photo_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(CrappifyError, match="not a crappify dataset"):
            build(photo_dir, out, overwrite=overwrite, preset="lesson7")
    assert sorted(os.listdir(out)) == ["precious.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CrappifyError, match="not a folder"):
        build(photo_dir, tmp_path / "file", preset="lesson7")


def test_empty_output_folder_is_fine(photo_dir, tmp_path):
    (tmp_path / "out").mkdir()
    assert build(photo_dir, tmp_path / "out", preset="lesson7", limit=2).built == 2


def test_unknown_preset_and_bad_scale_are_config_errors(photo_dir, tmp_path):
    with pytest.raises(ConfigError, match="lesson7"):
        build(photo_dir, tmp_path / "o1", preset="nope")
    with pytest.raises(ConfigError, match="--scale"):
        build(photo_dir, tmp_path / "o2", preset="lesson7", scale=4)
    with pytest.raises(ConfigError, match="fixes scale 4"):
        build(photo_dir, tmp_path / "o3", preset="srgan-x4", scale=2)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_missing_source_is_a_crappify_error(tmp_path):
    with pytest.raises(CrappifyError, match="source folder not found"):
        build(tmp_path / "missing", tmp_path / "out", preset="lesson7")
    assert not (tmp_path / "out").exists()


# --- kill and resume ------------------------------------------------------------------------------------


def _journal_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_after_journal_lines(argv: list[str], journal: Path, lines: int = 3) -> None:
    """Start a build command and SIGKILL it once its journal holds `lines` lines (the build must not finish
    first: asserted), leaving what a killed build leaves."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline and _journal_lines(journal) < lines:
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"


def test_killed_build_resumes_to_the_same_bytes(many_photo_dir, tmp_path, cli, cli_command, read_tree):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["build-dataset", str(many_photo_dir), str(out), "--preset", "realistic", "--seed", "11", "--quiet"]
    journal = out / JOURNAL
    kill_after_journal_lines([*cli_command, *args, "--workers", "1"], journal)
    assert not (out / "manifest.csv").exists()
    assert journal.is_file()

    # what the killed run left: finished items in the journal (a cut last line is possible)
    done = set()
    for line in journal.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            done.add(json.loads(line)["id"])
    assert 3 <= len(done) < 160
    # leftovers a kill can leave behind: a cut journal line and a temporary file
    with open(journal, "ab") as fh:
        fh.write(b'{"id":"d0/img000","spl')
    leftover = next((out / "hr").rglob("*.png")).with_name(".zz.png.crappify-tmp-99999")
    leftover.write_bytes(b"half a file")

    again = cli(*args, "--workers", "1")
    assert again.returncode == 0, again.stderr
    m = re.search(r"; (\d+) reused from an earlier run", again.stdout)
    assert m and int(m.group(1)) == len(done), again.stdout
    assert not temp_files(out)
    assert not journal.exists()

    full = cli(*args[:2], str(ref), *args[3:], "--workers", "2")
    assert full.returncode == 0, full.stderr
    ta, tb = read_tree(out), read_tree(ref)
    assert sorted(ta) == sorted(tb)
    assert len([k for k in ta if k.startswith("lr/")]) == 160
    for name in ta:
        assert ta[name] == tb[name], name


def _children(pid: int) -> set[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
    return found


def _workers_once_building(proc: subprocess.Popen, out: Path, files: int = 6) -> set[int]:
    """Wait until a running build has written `files` LR files; the worker processes seen meanwhile."""
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while proc.poll() is None and time.monotonic() < deadline and len(list((out / "lr").rglob("*.*"))) < files:
        workers |= _children(proc.pid)
        time.sleep(0.002)
    return workers


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_two_worker_build_leaves_no_workers_and_resumes(many_photo_dir, tmp_path, cli, cli_command,
                                                                read_tree):
    """The parent killed mid-run: its worker stops too (it would otherwise race the resumed run)."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["build-dataset", str(many_photo_dir), str(out), "--preset", "realistic", "--seed", "5", "--quiet",
            "--workers", "2"]
    proc = subprocess.Popen([*cli_command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        workers = _workers_once_building(proc, out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert workers, "no worker process was seen"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.05)
    alive = [w for w in workers if _running(w)]
    assert not alive, "worker processes outlived the killed build"
    assert not (out / "manifest.csv").exists()

    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert cli(*args[:2], str(ref), *args[3:]).returncode == 0
    ta, tb = read_tree(out), read_tree(ref)
    assert sorted(ta) == sorted(tb) and len([k for k in ta if k.startswith("lr/")]) == 160
    for name in ta:
        assert ta[name] == tb[name], name


def _sigint_default() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. A shell running the tests in the background
    ignores SIGINT, and an ignored signal stays ignored across exec (Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_ctrl_c_stops_every_worker_with_one_line(many_photo_dir, tmp_path, cli_command):
    # 4 links to each of the 160 photos: a build of ~10 s, so the signal surely comes mid-run (nothing is built
    # after it)
    src, out = tmp_path / "src", tmp_path / "out"
    for copy in range(4):
        for photo in many_photo_dir.rglob("*.jpg"):
            (src / str(copy)).mkdir(parents=True, exist_ok=True)
            os.link(photo, src / str(copy) / f"{photo.parent.name}_{photo.name}")
    proc = subprocess.Popen([*cli_command, "build-dataset", str(src), str(out), "--preset", "realistic",
                             "--workers", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_sigint_default)
    workers = _workers_once_building(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip() == "crappify: error: interrupted; run the same command again to resume"
    assert workers and not [w for w in workers if _running(w)]


def test_workers_do_not_deadlock_after_the_parent_used_opencv_threads(tmp_path):
    """Forking while OpenCV's thread pool is alive used to hang the workers' first parallel op."""
    script = f"""
import cv2, numpy as np
a = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for _ in range(3):
    cv2.GaussianBlur(cv2.resize(a, (1200, 1200)), (21, 21), 5)
from crappify.builder import BuildConfig, build_dataset
res = build_dataset(BuildConfig(src="samples", out={str(tmp_path / "out")!r}, preset="flickr30k-restore",
                                workers=2), progress=False)
print("built", res.built)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("built ")
