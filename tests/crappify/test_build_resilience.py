"""crappify.builder: what is the file's fault is skipped, what is not stops the run and is retried on resume;
a resumed build rebuilds the files its journal lists but that did not survive (power loss)."""

from __future__ import annotations

import builtins
import csv
import errno
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import crappify.imageio as imageio
from crappify.builder import JOURNAL, BuildConfig, build_dataset
from crappify.cli import main
from crappify.errors import CrappifyError


def build(src: Path, out: Path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("preset", "srgan-x4")
    kw.setdefault("size", 64)
    return build_dataset(BuildConfig(src=str(src), out=str(out), **kw), progress=False)


def rows(out: Path, name: str = "manifest.csv") -> list[dict[str, str]]:
    with open(out / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def journal_ids(out: Path) -> set[str]:
    if not (out / JOURNAL).is_file():
        return set()
    return {json.loads(line)["id"] for line in (out / JOURNAL).read_text().splitlines() if line.strip()}


@pytest.fixture()
def src(photo_dir, tmp_path) -> Path:
    return shutil.copytree(photo_dir, tmp_path / "src")


def _failing_open(monkeypatch, target: Path, err: int) -> None:
    """Make opening `target` fail with `err`, through os.open and the built-in open alike."""
    real_os_open, real_open = os.open, builtins.open
    target_s = os.fspath(target)

    def fail_if_target(path: object) -> None:
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) == target_s:
            raise OSError(err, os.strerror(err), target_s) if err != errno.EACCES else PermissionError(
                err, os.strerror(err), target_s)

    def fake_os_open(path, *args, **kw):
        fail_if_target(path)
        return real_os_open(path, *args, **kw)

    def fake_open(file, *args, **kw):
        fail_if_target(file)
        return real_open(file, *args, **kw)

    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("err, workers", [(errno.EIO, 1), (errno.EMFILE, 1), (errno.EACCES, 1), (errno.EIO, 2)])
def test_read_errors_stop_the_run_and_are_retried_on_resume(src, tmp_path, monkeypatch, err, workers, read_tree):
    target = sorted(src.rglob("*.jpg"))[1]
    out, ref = tmp_path / "out", tmp_path / "ref"
    with monkeypatch.context() as m:
        _failing_open(m, target, err)  # a forked worker inherits the fault
        with pytest.raises(CrappifyError) as info:
            build(src, out, workers=workers)
    assert not multiprocessing.active_children()  # the workers were stopped with the run
    message = str(info.value)
    assert str(target) in message and "\n" not in message
    assert os.strerror(err).lower() in message.lower() or "permission denied" in message
    assert not (out / "skipped.csv").exists()  # never recorded as a bad file
    target_id = target.relative_to(src).with_suffix("").as_posix()
    assert target_id not in journal_ids(out)
    res = build(src, out)  # the fault is gone: resumed, and the file is built
    assert res.skipped == 0 and target_id in {r["id"] for r in rows(out)}
    build(src, ref)
    assert read_tree(out) == read_tree(ref)


def test_out_of_memory_while_decoding_stops_the_run_instead_of_skipping(src, tmp_path, monkeypatch):
    target = sorted(src.rglob("*.png"))[0]
    data = target.read_bytes()
    real = imageio.Image.open

    def fake(fp, *args, **kw):
        if hasattr(fp, "getvalue") and fp.getvalue() == data:
            raise MemoryError
        return real(fp, *args, **kw)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(imageio.Image, "open", fake)
        with pytest.raises(CrappifyError, match="out of memory") as info:
            build(src, out)
    assert str(target) in str(info.value)
    assert not (out / "skipped.csv").exists()
    assert build(src, out).skipped == 0


def test_a_bug_while_decoding_is_not_recorded_as_a_corrupt_file(src, tmp_path, monkeypatch):
    def broken(img):
        raise AttributeError("a bug")

    monkeypatch.setattr(imageio, "_to_rgb8", broken)
    Image.new("RGB", (96, 80), (200, 100, 50)).quantize(8).save(src / "palette.png")  # decoded by Pillow
    with pytest.raises(AttributeError, match="a bug") as info:
        build(src, tmp_path / "out")
    notes = getattr(info.value, "__notes__", [])
    assert any("palette.png" in note for note in notes) or not hasattr(info.value, "add_note")
    assert not (tmp_path / "out" / "skipped.csv").exists()


def test_read_error_is_one_line_on_the_command_line(src, tmp_path, monkeypatch, capsys):
    target = sorted(src.rglob("*.jpg"))[0]
    _failing_open(monkeypatch, target, errno.EIO)
    with pytest.raises(SystemExit) as info:
        main(["build-dataset", str(src), str(tmp_path / "out"), "--preset", "srgan-x4", "--workers", "1",
              "--quiet"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("crappify: error: cannot read ") and str(target) in err
    assert "Traceback" not in err


def test_skips_recorded_by_older_versions_for_read_errors_are_retried(src, tmp_path):
    out = tmp_path / "out"
    build(src, out)
    first = rows(out)
    victim = first[0]
    # as an older version left it: the photo recorded as skipped for a permission error
    kept = [r for r in first if r["id"] != victim["id"]]
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(victim), lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    (out / "skipped.csv").write_text(f"source,reason\n{victim['source']},permission denied\n")
    res = build(src, out)
    assert res.skipped == 0 and res.built == len(first)


# --- resume after a power loss ---------------------------------------------------------------------------


def _as_killed(out: Path) -> None:
    """Turn a finished build into what a killed one leaves: the journal of finished items, no manifest."""
    lines = [json.dumps(r) for r in rows(out)]
    (out / JOURNAL).write_text("\n".join(lines) + "\n")
    (out / "manifest.csv").unlink()
    (out / "skipped.csv").unlink()


@pytest.mark.parametrize("state", ["journal", "manifest"])
@pytest.mark.parametrize("preset", ["srgan-x4", "lesson7"])
def test_resume_rebuilds_listed_files_that_did_not_survive(src, tmp_path, read_tree, state, preset):
    """Dataset images are not fsynced: after a power loss the journal (or manifest) can list files that are
    empty, zero-filled or missing their end. A resumed build checks them and rebuilds the broken ones."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    kw = {"preset": preset, "size": 64 if preset == "srgan-x4" else None, "link_hr": False}
    build(src, ref, **kw)
    build(src, out, **kw)
    listed = rows(out)
    if state == "journal":
        _as_killed(out)
    damaged = [
        (out / listed[0]["hr"], lambda b: b""),  # empty (the usual result of a power loss)
        (out / listed[1]["lr"], lambda b: bytes(len(b))),  # the right size, all zeros
        (out / listed[2]["lr"], lambda b: b[:-100] + bytes(100)),  # its last block never written
        (out / listed[3]["hr"], lambda b: bytes(2048) + b[2048:]),  # its first block never written
    ]
    for path, damage in damaged:
        path.write_bytes(damage(path.read_bytes()))
    res = build(src, out, **kw)
    assert res.reused == len(listed) - len(damaged)
    assert read_tree(out) == read_tree(ref)


def test_resume_rebuilds_a_file_whose_size_differs_from_its_row(src, tmp_path, read_tree):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build(src, ref)
    build(src, out)
    listed = rows(out)
    a, b = out / listed[0]["lr"], out / listed[1]["lr"]
    a.write_bytes(b.read_bytes())  # a whole image, but another pair's (a different size)
    assert Image.open(a).size != (int(listed[0]["lr_width"]), int(listed[0]["lr_height"]))
    res = build(src, out)
    assert res.reused == len(listed) - 1
    assert read_tree(out) == read_tree(ref)


def test_a_second_build_into_the_same_out_fails_with_one_line_and_stale_temporaries_go(photo_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from crappify.runlock import folder_lock\n"
        f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CrappifyError, match=rf"in use by another build-dataset run \(pid {holder.pid}\)"):
            build(photo_dir, out)
    finally:
        holder.kill()
        holder.wait()
    build(photo_dir, out)  # the lock went with its process
    dead = out / "hr" / f".photo.png.crappify-tmp-{2 ** 22 + 12345}"  # left by a killed build (no such pid)
    dead.write_bytes(b"half")
    (out / JOURNAL).write_text("")  # an interrupted build resumes (and cleans up first)
    build(photo_dir, out)
    assert not dead.exists() and not (out / ".lock").exists()
