"""Crafted files that must be skipped with a reason, never crash, hang or exhaust a build, and output
folders that --overwrite must not clear. Every file is made here by the test itself.

- a 16-bit PNG OpenCV cannot decode (bad IDAT CRC: Pillow reads its header, libpng refuses the data);
- an 8-bit PNG with a bad IDAT CRC, truncated WebP / TIFF / GIF;
- a FIFO and a symlink to /dev/zero in a source folder, and a file over --max-bytes;
- a user's folder holding a config.yaml of its own (a mapping, or not a mapping), with --overwrite.
"""

from __future__ import annotations

import csv
import io
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from crappify.builder import MARKER, BuildConfig, build_dataset
from crappify.errors import CrappifyError
from crappify.imageio import ImageError, Photo, decode

CLI = [sys.executable, "-m", "crappify.cli"]


def build(src: Path, out: Path, overwrite: bool = False, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("preset", "srgan-x4")
    return build_dataset(BuildConfig(src=str(src), out=str(out), **kw), overwrite=overwrite, progress=False)


def skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        return {r["source"]: r["reason"] for r in csv.DictReader(fh)}


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crappify: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _idat_crc_broken(png: bytes) -> bytes:
    """`png` with its first IDAT chunk's CRC zeroed (the data itself intact)."""
    i = 8
    while png[i + 4:i + 8] != b"IDAT":
        i += 12 + int.from_bytes(png[i:i + 4], "big")
    n = int.from_bytes(png[i:i + 4], "big")
    return png[:i + 8 + n] + b"\0\0\0\0" + png[i + 12 + n:]


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory, photo_maker) -> Path:
    """Two good photos beside every kind of broken file (no FIFO or device: see the CLI test)."""
    root = tmp_path_factory.mktemp("hostile")
    img = photo_maker(0, 96)
    Image.fromarray(img).save(root / "good.jpg", quality=90)
    Image.fromarray(photo_maker(1, 96)).save(root / "good.png")
    ok, buf = cv2.imencode(".png", (img.astype(np.uint16) * 257)[..., ::-1].copy())
    assert ok
    (root / "rgb16_bad_crc.png").write_bytes(_idat_crc_broken(buf.tobytes()))
    ok, buf = cv2.imencode(".png", img[..., ::-1].copy())
    (root / "rgb8_bad_crc.png").write_bytes(_idat_crc_broken(buf.tobytes()))
    for fmt, ext in (("WEBP", ".webp"), ("TIFF", ".tif"), ("GIF", ".gif")):
        data = io.BytesIO()
        Image.fromarray(img).save(data, fmt)
        (root / f"truncated{ext}").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return root


def test_sixteen_bit_png_opencv_cannot_decode_is_an_image_error(hostile_dir):
    path = hostile_dir / "rgb16_bad_crc.png"
    with Image.open(path) as img:  # Pillow reads the header (and, for its EXIF, even the pixels)
        assert img.mode == "RGB" and "16" in str(img.tile[0][3])
    with pytest.raises(ImageError, match="16-bit PNG"):
        decode(path)


@pytest.mark.parametrize("name", ["rgb8_bad_crc.png", "truncated.webp", "truncated.tif", "truncated.gif"])
def test_broken_files_decode_whole_or_raise_image_error(hostile_dir, name):
    try:
        img = decode(hostile_dir / name)
    except ImageError as exc:
        assert "\n" not in str(exc)
        return
    assert img.dtype == np.uint8 and img.shape[2] == 3 and min(img.shape[:2]) > 0


def test_build_skips_broken_files_with_a_reason_and_builds_the_rest(hostile_dir, tmp_path):
    res = build(hostile_dir, tmp_path / "out", size=64)
    assert res.built >= 2
    reasons = skipped(tmp_path / "out")
    assert "16-bit PNG" in reasons["rgb16_bad_crc.png"]
    for name in ("truncated.webp", "truncated.tif", "truncated.gif"):
        assert name in reasons
    assert "good.jpg" not in reasons and "good.png" not in reasons


# --- special and huge files -------------------------------------------------------------------------------


def _unblock_later(fifo: Path, seconds: float) -> threading.Timer:
    """If a reader hangs on `fifo` (a regression), open and close its write end so that the test fails
    instead of hanging."""
    def release() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nobody is reading: nothing hangs
            return
        os.close(fd)

    timer = threading.Timer(seconds, release)
    timer.daemon = True
    timer.start()
    return timer


def test_fifo_is_refused_before_it_is_opened_for_reading(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    timer = _unblock_later(fifo, 10)
    try:
        with pytest.raises(ImageError, match="not a regular file"):
            Photo(fifo)
    finally:
        timer.cancel()


def test_file_over_max_bytes_is_refused_before_reading(tmp_path, photo_maker):
    path = tmp_path / "a.jpg"
    Image.fromarray(photo_maker(2, 96)).save(path, quality=90)
    size = path.stat().st_size
    with pytest.raises(ImageError, match="too large"):
        Photo(path, max_bytes=size - 1)
    with Photo(path, max_bytes=size) as photo:
        assert photo.size[0] == 96 or photo.size[1] == 96
    sparse = tmp_path / "huge.png"  # 300 MiB of nothing, stored as a hole: over the default cap
    with open(sparse, "wb") as fh:
        fh.truncate(300 * 1024 * 1024)
    with pytest.raises(ImageError, match="too large"):
        Photo(sparse)


def _limit_memory() -> None:  # in the child: 4 GiB of address space, so a regression fails instead of thrashing
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_build_skips_fifo_dev_zero_and_oversized_files(tmp_path, photo_maker):
    """The command line, in a subprocess with a timeout and a memory limit: a FIFO would hang a worker that
    opens it and /dev/zero would fill its memory; both are skipped with a reason, as is a file over
    --max-bytes, and the good photos are built."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo_maker(i, 96)).save(src / f"good{i}.jpg", quality=90)
    Image.fromarray(photo_maker(3, 160)).save(src / "big.png")
    os.mkfifo(src / "pipe.jpg")
    os.symlink("/dev/zero", src / "zero.png")
    os.symlink(src / "missing.jpg", src / "dangling.jpg")
    max_bytes = (src / "big.png").stat().st_size - 1
    timer = _unblock_later(src / "pipe.jpg", 60)
    try:
        proc = subprocess.run([*CLI, "build-dataset", str(src), str(out), "--preset", "srgan-x4", "--size", "64",
                               "--workers", "2", "--max-bytes", str(max_bytes), "--quiet"],
                              capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    finally:
        timer.cancel()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    reasons = skipped(out)
    assert "FIFO" in reasons["pipe.jpg"]
    assert "character device" in reasons["zero.png"]
    assert "too large" in reasons["big.png"]
    assert "file not found" in reasons["dangling.jpg"]
    assert "built 3 pairs" in proc.stdout


def test_max_bytes_is_a_build_option_in_flags_and_config_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-bytes: 12345\n")
    from crappify.config import resolve

    assert resolve(BuildConfig, cfg, src="s", out="o").max_bytes == 12345
    assert resolve(BuildConfig, cfg, src="s", out="o", max_bytes=99).max_bytes == 99
    with pytest.raises(CrappifyError, match="max_bytes"):
        resolve(BuildConfig, None, src="s", out="o", max_bytes=0)
    # `crappify run` hashes a stage's dump: at its default the new option leaves existing pipelines' hashes alone
    assert "max_bytes" not in BuildConfig(src="s", out="o").model_dump(mode="json")
    assert BuildConfig(src="s", out="o", max_bytes=99).model_dump(mode="json")["max_bytes"] == 99


# --- --overwrite and foreign folders --------------------------------------------------------------------


def _user_folder(root: Path, config: str) -> Path:
    """Somebody's project folder: its own config.yaml, and hr/ and lr/ folders of its own."""
    root.mkdir()
    (root / "config.yaml").write_text(config)
    for sub in ("hr", "lr"):
        (root / sub).mkdir()
        (root / sub / "precious.txt").write_text("keep me")
    (root / "manifest.csv").write_text("name,notes\nmine,keep\n")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("config", ["model: resnet\nepochs: 10\n", "- a\n- b\n", "just text\n", ":\n  - [\n"])
def test_overwrite_refuses_a_folder_crappify_did_not_build(photo_dir, tmp_path, config):
    out = _user_folder(tmp_path / "project", config)
    before = _tree(out)
    for overwrite in (True, False):
        with pytest.raises(CrappifyError) as info:
            build(photo_dir, out, overwrite=overwrite, size=64)
        assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert _tree(out) == before


def test_overwrite_refusal_is_one_line_on_the_command_line(photo_dir, tmp_path):
    for name, config in (("mapping", "model: resnet\n"), ("list", "- 1\n- 2\n")):
        out = _user_folder(tmp_path / name, config)
        before = _tree(out)
        proc = subprocess.run([*CLI, "build-dataset", str(photo_dir), str(out), "--preset", "srgan-x4",
                               "--overwrite", "--quiet"], capture_output=True, text=True, timeout=120)
        one_line_error(proc, str(out))
        assert _tree(out) == before


def test_overwrite_clears_datasets_it_built_including_ones_from_before_the_marker(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, size=64, limit=3)
    assert (out / MARKER).is_file()
    build(photo_dir, out, overwrite=True, size=64, limit=2, seed=1)  # ours: cleared and rebuilt
    (out / MARKER).unlink()  # as a dataset built before the marker existed
    res = build(photo_dir, out, overwrite=True, size=64, limit=3, seed=2)
    assert res.built == 3 and res.reused == 0
    assert (out / MARKER).is_file()


def test_a_dataset_whose_config_is_not_a_mapping_needs_overwrite(photo_dir, tmp_path):
    out = tmp_path / "out"
    build(photo_dir, out, size=64, limit=2)
    (out / "config.yaml").write_text("[1, 2]\n")
    with pytest.raises(CrappifyError, match=r"not a YAML mapping.*--overwrite"):
        build(photo_dir, out, size=64, limit=2)
    assert build(photo_dir, out, overwrite=True, size=64, limit=2).built == 2
