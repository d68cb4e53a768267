"""Stale temporary files: only this tool's, only in the folders asked for, of any target name's length."""

from __future__ import annotations

import os

from crappify.imageio import TEMP_TAG, _temp_name, is_temp_name, temp_prefix, write_atomic
from crappify.runlock import clean_stale_temps

DEAD_PID = 2 ** 22 + 4321  # above Linux's pid_max: never a live process


def test_only_our_tagged_temporaries_of_dead_processes_go(tmp_path):
    ours = tmp_path / f".a.png{TEMP_TAG}{DEAD_PID}"
    live = tmp_path / f".b.png{TEMP_TAG}{os.getppid()}"  # a running process's: being written now
    users = [tmp_path / f".thesis.docx.tmp-{DEAD_PID}", tmp_path / f".a.png.tmp-{DEAD_PID}",
             tmp_path / f"x{TEMP_TAG}{DEAD_PID}", tmp_path / f".c{TEMP_TAG}{DEAD_PID}x"]
    nested = tmp_path / "sub" / f".d.png{TEMP_TAG}{DEAD_PID}"
    nested.parent.mkdir()
    for path in (ours, live, nested, *users):
        path.write_bytes(b"x")
    assert clean_stale_temps(tmp_path) == 1
    assert not ours.exists() and live.exists() and nested.exists()
    assert all(p.exists() for p in users)
    assert clean_stale_temps(tmp_path, recursive=True) == 1 and not nested.exists()


def test_under_the_folders_lock_a_killed_runs_temporary_goes_even_when_its_pid_was_reused(tmp_path):
    """pid_max is 32768 on many systems: a killed build's worker pid may belong to another process by the time
    the build resumes. Holding the dataset's lock, the builder knows no run of ours writes there."""
    reused = tmp_path / "hr" / f".img040.png{TEMP_TAG}{os.getppid()}"  # the pid of a live, unrelated process
    own = tmp_path / f".x.png{TEMP_TAG}{os.getpid()}"
    user = tmp_path / f".notes.tmp-{os.getppid()}"
    reused.parent.mkdir()
    for path in (reused, own, user):
        path.write_bytes(b"x")
    assert clean_stale_temps(tmp_path, recursive=True) == 0 and reused.exists()
    assert clean_stale_temps(tmp_path, recursive=True, locked=True) == 1
    assert not reused.exists() and own.exists() and user.exists()


def test_a_resumed_build_removes_a_killed_workers_temporary_whatever_its_pid(tmp_path):
    from crappify.builder import BuildConfig, build_dataset

    out = tmp_path / "ds"
    cfg = BuildConfig(src="samples", out=str(out), preset="srgan-x4", size=64, split=(0.6, 0.2, 0.2), workers=1)
    build_dataset(cfg, progress=False)
    (out / "manifest.csv").unlink()  # as a killed build leaves it: no manifest yet
    stale = next((out / "hr").rglob("*.png")).with_name(f".img.png{TEMP_TAG}{os.getppid()}")
    stale.write_bytes(b"half a png")
    build_dataset(cfg, progress=False)
    assert not stale.exists() and (out / "manifest.csv").is_file()


def test_names_limit_the_sweep_to_the_outputs_about_to_be_written(tmp_path):
    a, b = (tmp_path / f".{n}{TEMP_TAG}{DEAD_PID}" for n in ("a.png", "b.png"))
    for path in (a, b):
        path.write_bytes(b"x")
    assert clean_stale_temps(tmp_path, ["a.png", "c.png"]) == 1
    assert not a.exists() and b.exists()


def test_a_link_named_like_a_temporary_is_left_alone(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_bytes(b"keep")
    link = tmp_path / f".k{TEMP_TAG}{DEAD_PID}"
    link.symlink_to(target)
    assert clean_stale_temps(tmp_path) == 0 and link.is_symlink()


def test_a_name_of_255_bytes_has_a_temporary_name_that_fits(tmp_path):
    for name in ("a" * 251 + ".png", "é" * 125 + ".png"):  # 255 bytes each, the most ext4 allows
        assert len(os.fsencode(name)) <= 255
        tmp = os.path.basename(_temp_name(tmp_path / name))
        assert len(os.fsencode(tmp)) <= 255 and is_temp_name(tmp)
        write_atomic(tmp_path / name, b"data")
        assert (tmp_path / name).read_bytes() == b"data"
        stale = tmp_path / f"{temp_prefix(name)}{DEAD_PID}"
        stale.write_bytes(b"half")
        assert clean_stale_temps(tmp_path, [name]) == 1 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(("a" * 251 + ".png", "é" * 125 + ".png"))
