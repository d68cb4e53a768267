"""Files that are not photos whatever their names say: PostScript/EPS/PDF named `.jpg` must be skipped with a
reason, never handed to an external program (Pillow's EPS plug-in runs Ghostscript, `gs`, to decode)."""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

import cv2
import pytest

from crappify.imageio import ImageError, Photo

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\n"
       b"newpath 0 0 moveto 64 48 lineto stroke showpage\n%%EOF\n")
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that leaves a marker file when anything starts it (and then fails)."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-run"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marker


@pytest.mark.parametrize("data", [EPS, PDF], ids=["eps", "pdf"])
def test_postscript_named_jpg_is_not_a_photo_and_runs_nothing(data, tmp_path, fake_gs):
    path = tmp_path / "holiday.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError), Photo(path) as photo:
        photo.pixels(16)
    assert not fake_gs.exists()


def test_build_and_enhance_skip_postscript_in_one_line(tmp_path, fake_gs, photo_maker, cli):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        cv2.imwrite(str(src / f"p{i}.png"), photo_maker(i, long_side=96)[..., ::-1])
    (src / "holiday.jpg").write_bytes(EPS)
    res = cli("build-dataset", src, out, "--preset", "srgan-x4", "--size", "32", "--workers", "1")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        reasons = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert "holiday.jpg" in reasons, reasons
    assert not fake_gs.exists()

    from srgan.checkpoint import save_generator
    from srgan.generators import build_generator

    model = tmp_path / "g.safetensors"
    save_generator(build_generator("srresnet", scale=2, n_blocks=1, n_feats=4), model, data_scale=2)
    res = cli("enhance", src, "-m", model, "-o", tmp_path / "enhanced")
    assert "Traceback" not in res.stderr and "holiday.jpg" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "enhanced").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    assert not fake_gs.exists()
