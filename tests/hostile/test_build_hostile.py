"""build-dataset and merge-datasets on the files people really have and on hostile ones (issue 23): symlinked
photos, OUT inside SRC, odd file names, a part holding links to devices and FIFOs, a full disk and a read-only
OUT, a SIGKILLed build's workers. Every file is made here by the test itself."""

from __future__ import annotations

import csv
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crappify.builder import MARKER, BuildConfig, build_dataset, write_tables
from crappify.cli import main
from crappify.errors import CrappifyError
from crappify.merge import merge_datasets

CLI = [sys.executable, "-m", "crappify.cli"]
OPTIONS = {"preset": "srgan-x4", "workers": 1}


def build(src: Path, out: Path, **kw):
    return build_dataset(BuildConfig(src=str(src), out=str(out), **{**OPTIONS, **kw}), progress=False)


def table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def photo(path: Path, photo_maker, index: int) -> Path:
    """A 96x64 JPEG (both sides multiples of 4, so srgan-x4 links it as the HR unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(photo_maker(index, 128)[:64, :96])).save(path, quality=90)
    return path


def one_line_error(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("crappify: note:")]
    assert len(lines) == 1 and lines[0].startswith("crappify: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- item 3: symlinked source photos ------------------------------------------------------------------------


def test_symlinked_photos_become_regular_files_inside_out_that_train_gen_reads(tmp_path, photo_maker):
    """Relative, absolute and chained links give their target's bytes as a regular file inside OUT (a hard link to
    the target, never to the link); a dangling link is skipped; a linked folder is walked like a folder (as
    sources.py does); a resume reuses every pair; train-gen's reader accepts the dataset."""
    from srgan.data import read_dataset

    real, src, out = tmp_path / "real", tmp_path / "src", tmp_path / "out"
    targets = [photo(real / f"r{i}.jpg", photo_maker, i) for i in range(3)]
    (src / "sub").mkdir(parents=True)
    os.symlink("../../real/r0.jpg", src / "sub" / "rel.jpg")
    os.symlink(targets[1], src / "abs.jpg")
    os.symlink("abs.jpg", src / "chain.jpg")
    os.symlink("missing.jpg", src / "dangling.jpg")
    os.symlink("loop2.jpg", src / "loop1.jpg")
    os.symlink("loop1.jpg", src / "loop2.jpg")
    os.symlink(real, src / "linked", target_is_directory=True)
    os.symlink(".", src / "loop", target_is_directory=True)
    photo(src / "plain.jpg", photo_maker, 4)

    res = build(src, out, split=(0.5, 0.25, 0.25))
    rows = {r["id"]: r for r in table(out / "manifest.csv")}
    assert set(rows) == {"sub/rel", "abs", "chain", "plain", "linked/r0", "linked/r1", "linked/r2"}
    assert res.built == 7
    reasons = {r["source"]: r["reason"] for r in table(out / "skipped.csv")}
    assert "file not found" in reasons["dangling.jpg"] and "loop" in reasons["loop1.jpg"]
    target_of = {"sub/rel": targets[0], "abs": targets[1], "chain": targets[1], "linked/r2": targets[2]}
    for item_id, row in rows.items():
        for column in ("hr", "lr"):
            path = out / row[column]
            assert not path.is_symlink() and path.is_file(), (item_id, column)
            assert os.path.realpath(path).startswith(os.path.realpath(out) + os.sep)
        if item_id in target_of:  # the target's own bytes, hard-linked
            hr = out / row["hr"]
            assert hr.read_bytes() == target_of[item_id].read_bytes()
            assert hr.stat().st_ino == target_of[item_id].stat().st_ino

    splits, _ = read_dataset(out)
    assert sum(len(v) for v in splits.values()) == 7

    manifest = (out / "manifest.csv").read_bytes()
    again = build(src, out, split=(0.5, 0.25, 0.25))
    assert (again.built, again.reused) == (7, 9)  # nothing redone: 7 pairs and the 2 loops' skips
    assert (out / "manifest.csv").read_bytes() == manifest

    # an HR that an older version made as a hard link to the symlink itself is rebuilt on resume
    hr = out / rows["abs"]["hr"]
    hr.unlink()
    os.link(src / "abs.jpg", hr, follow_symlinks=False)
    assert hr.is_symlink()
    healed = build(src, out, split=(0.5, 0.25, 0.25))
    assert (healed.built, healed.reused) == (7, 8)
    assert not hr.is_symlink() and hr.stat().st_ino == targets[1].stat().st_ino


# --- item 4: OUT inside SRC ----------------------------------------------------------------------------------


def test_out_inside_src_is_never_read_as_source(tmp_path, photo_maker, capsys):
    """`build-dataset photos photos/ds` run twice lists the same photos both times (no split leak from its own
    outputs), and says in one note line that it left ds (and another dataset in SRC) out."""
    src = tmp_path / "photos"
    for i in range(8):
        photo(src / ("a" if i % 2 else "") / f"p{i}.jpg", photo_maker, i)
    other = tmp_path / "photos" / "older"  # another dataset inside SRC: its files are not photos either
    photo(other / "hr" / "train" / "x.jpg", photo_maker, 9)
    (other / MARKER).write_text("a dataset\n")
    out = src / "ds"
    opts = {"split": (0.5, 0.25, 0.25)}

    first = build(src, out, **opts)
    first_tables = [(out / n).read_bytes() for n in ("manifest.csv", "skipped.csv")]
    second = build(src, out, **opts)
    assert (first.built, first.skipped, first.per_split) == (second.built, second.skipped, second.per_split)
    assert first.built == 8 and second.reused == 8
    assert [(out / n).read_bytes() for n in ("manifest.csv", "skipped.csv")] == first_tables
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("crappify: note:")]
    assert len(notes) == 2 and "ds" in notes[1] and "older" in notes[1]


def test_src_that_is_out_or_a_dataset_is_refused_in_one_line(tmp_path, photo_maker):
    src = tmp_path / "photos"
    photo(src / "p.jpg", photo_maker, 0)
    with pytest.raises(CrappifyError, match="output folder"):
        build(src, src)
    build(src, tmp_path / "ds")
    with pytest.raises(CrappifyError, match="dataset this tool built"):
        build(tmp_path / "ds", tmp_path / "ds2")


# --- item 12: merge-datasets reads only what a part's manifest lists ---------------------------------------


@pytest.fixture
def parts(tmp_path, photo_maker) -> list[Path]:
    src = tmp_path / "src"
    for i in range(6):
        photo(src / f"p{i}.jpg", photo_maker, i)
    found = [tmp_path / f"part{k}" for k in (1, 2)]
    for k, part in enumerate(found, 1):
        build(src, part, shard=f"{k}/2", split=(0.5, 0.25, 0.25))
    return found


def _listed(folder: Path) -> set[str]:
    return {r[c] for r in table(folder / "manifest.csv") for c in ("hr", "lr")}


def _data_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for d in ("hr", "lr") for p in (folder / d).rglob("*")
            if not p.is_dir()}


def test_merge_takes_only_the_files_the_manifests_list(parts, tmp_path):
    """A link to /dev/zero, a FIFO and a stray file beside a part's files are never linked, copied or opened."""
    hr = parts[0] / "hr" / "train"
    os.symlink("/dev/zero", hr / "zero.jpg")
    os.mkfifo(hr / "pipe.jpg")
    (hr / "stray.png").write_bytes(b"not ours")
    res = merge_datasets(parts, tmp_path / "out")
    expected = _listed(parts[0]) | _listed(parts[1])
    assert _data_files(tmp_path / "out") == expected
    assert res.linked == len(expected)


def test_merge_copies_listed_files_across_filesystems(parts, tmp_path, monkeypatch):
    real_link = os.link

    def no_link(src, dst, *a, **kw):  # as between two filesystems
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", no_link)
    res = merge_datasets(parts, tmp_path / "out")
    monkeypatch.setattr(os, "link", real_link)
    assert res.copied == len(_listed(parts[0]) | _listed(parts[1])) and res.linked == 0
    for rel in _listed(parts[0]):
        assert (tmp_path / "out" / rel).read_bytes() == (parts[0] / rel).read_bytes()


def _limit_memory() -> None:  # in the child: 2 GiB of address space, so /dev/zero fails fast instead of thrashing
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("name, kind", [("hr", "zero"), ("hr", "fifo"), ("config.yaml", "zero"),
                                        ("config.yaml", "fifo"), ("manifest.csv", "zero")])
def test_merge_refuses_a_part_whose_files_are_devices_or_fifos(parts, tmp_path, name, kind):
    """A listed file or a table replaced by a link to /dev/zero or a FIFO: one line naming the part, no hang, no
    memory blow-up, and, where the copy path is taken (another filesystem), never a read of the device."""
    victim = parts[0] / (sorted(_listed(parts[0]))[0] if name == "hr" else name)
    victim.unlink()
    if kind == "zero":
        os.symlink("/dev/zero", victim)
    else:
        os.mkfifo(victim)
    script = ("import errno, os, sys\n"
              "def no_link(*a, **k): raise OSError(errno.EXDEV, 'cross-device link')\n"
              "os.link = no_link\n"
              "from crappify.cli import main\nmain(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, "merge-datasets", *map(str, parts), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          preexec_fn=_limit_memory)
    assert proc.returncode != 0
    one_line_error(proc.stderr, str(parts[0]))


# --- item 14: names that corrupt a CSV or make ids train-gen refuses --------------------------------------


def test_tables_round_trip_every_field(tmp_path):
    odd = ["cr\ronly", "lf\nonly", "crlf\r\nboth", 'quote"d', "comma,ed", "back\\slash", " spaced ", "café", "",
           "tab\there", '"', "\r"]
    rows = [{"id": str(i), "split": "train", "source": v, "hr": f"hr/train/{i}.png", "lr": f"lr/train/{i}.png",
             "seed": "1", "hr_width": "8", "hr_height": "8", "lr_width": "2", "lr_height": "2", "caption": v,
             "params": "{}"} for i, v in enumerate(odd)]
    skipped = [(v, f"reason {v}") for v in odd]
    write_tables(tmp_path, rows, skipped)
    assert table(tmp_path / "manifest.csv") == rows
    assert sorted((r["source"], r["reason"]) for r in table(tmp_path / "skipped.csv")) == sorted(skipped)
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:  # any reader: one row per record
        assert len(list(csv.reader(fh))) == len(rows) + 1


def _odd_name(folder: Path, name: str | bytes, photo_maker, index: int) -> str | None:
    """A photo under an odd name; None where the filesystem refuses the name."""
    try:
        path = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
        Image.fromarray(np.ascontiguousarray(photo_maker(index, 128)[:64, :96])).save(path, format="JPEG")
    except (OSError, ValueError):
        return None
    return os.fsdecode(name)


def test_odd_names_are_built_or_skipped_with_a_reason_and_train_gen_reads_the_rest(tmp_path, photo_maker):
    from srgan.data import read_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    good = ['q"uote,comma.jpg', "café.jpg", " space.jpg", "ok.jpg"]
    bad = ["cr\rname.jpg", "lf\nname.jpg", "back\\slash.jpg", "tab\tname.jpg", b"caf\xe9-latin1.jpg"]
    for i, name in enumerate(good):
        assert _odd_name(src, name, photo_maker, i)
    made_bad = [n for i, name in enumerate(bad) if (n := _odd_name(src, name, photo_maker, i)) is not None]
    res = build(src, out, split=(1.0, 0.0, 0.0))
    assert res.built == len(good) and res.skipped == len(made_bad)
    ids = [r["id"] for r in table(out / "manifest.csv")]
    assert sorted(ids) == sorted(n[:-4] for n in good)
    reasons = [r["reason"] for r in table(out / "skipped.csv")]
    assert len(reasons) == len(made_bad) and all(r.startswith("file name cannot name") for r in reasons)
    splits, _ = read_dataset(out)
    assert sorted(p.id for p in splits["train"]) == sorted(ids)
    again = build(src, out, split=(1.0, 0.0, 0.0))
    assert again.reused == len(good)


@pytest.mark.parametrize("item_id", ["a\rb", "a\nb", "a\x1bb", "a\\b", "../x", "a//b", "a/b c", "café", 'q"u,o'])
def test_train_gen_accepts_an_id_exactly_when_a_build_does(sr_dataset, tmp_path, item_id):
    """One rule (crappify.sources.id_problem) for the builder and srgan's reader: before it, train-gen took ids
    with CR, LF or other control characters that a build must not make, and a build made ids with a backslash
    that train-gen refused."""
    import shutil

    from crappify.sources import id_problem
    from srgan.data import read_dataset

    data = tmp_path / "data"
    shutil.copytree(sr_dataset, data)
    rows = table(data / "manifest.csv")
    rows[0]["id"] = item_id
    write_tables(data, rows, [])
    if id_problem(item_id) is None:
        read_dataset(data)
    else:
        with pytest.raises(CrappifyError, match="id"):
            read_dataset(data)


# --- item 15: a full disk and a read-only OUT ----------------------------------------------------------------


def test_disk_full_at_the_manifest_write_is_one_line_and_a_rerun_ends_identical(photo_dir, tmp_path, monkeypatch,
                                                                                 capsys, read_tree):
    ref, out = tmp_path / "ref", tmp_path / "out"
    build(photo_dir, ref)
    real_replace = os.replace

    def full(src, dst, *a, **kw):
        if os.path.basename(dst) == "manifest.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit) as exc:
        main(["build-dataset", str(photo_dir), str(out), "--preset", "srgan-x4", "--workers", "1", "--quiet"])
    assert exc.value.code != 0
    one_line_error(capsys.readouterr().err, str(out / "manifest.csv"), os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", real_replace)
    build(photo_dir, out)
    assert read_tree(out) == read_tree(ref)


def test_read_only_out_is_one_line(photo_dir, tmp_path, monkeypatch, capsys):
    """In-process (works as root too): every file made under OUT fails as on a read-only filesystem."""
    out = tmp_path / "out"
    out.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def ro_open(path, flags, *a, **kw):
        if flags & os.O_CREAT and str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **kw)

    def ro_mkdir(path, *a, **kw):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    for target in (out, out / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["build-dataset", str(photo_dir), str(target), "--preset", "srgan-x4", "--workers", "1", "--quiet"])
        assert exc.value.code != 0
        one_line_error(capsys.readouterr().err, str(target), os.strerror(errno.EROFS))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_on_the_command_line(photo_dir, tmp_path):
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    try:
        for target, mode in ((parent / "out", 0o555), (parent / "new", 0o555)):
            os.chmod(parent / "out", 0o555)
            os.chmod(parent, mode)
            proc = subprocess.run([*CLI, "build-dataset", str(photo_dir), str(target), "--preset", "srgan-x4",
                                   "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=120)
            assert proc.returncode != 0
            one_line_error(proc.stderr, str(target))
    finally:
        os.chmod(parent, 0o755)
        os.chmod(parent / "out", 0o755)


# --- item 16: a SIGKILLed build leaves no worker holding the lock -----------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SLOW_BUILD = """import sys, time
import crappify.builder as builder
_process = builder.process_item
def slow(item, job):  # each item takes a while, so a worker is busy when its parent is killed
    time.sleep(0.4)
    return _process(item, job)
builder.process_item = slow
from crappify.cli import main
main(sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_build_leaves_no_worker_holding_the_lock(photo_dir, tmp_path):
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, "build-dataset", str(photo_dir), str(out),
                                 "--preset", "srgan-x4", "--workers", "2", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 60
    try:
        while not any((out / "lr").rglob("*.png")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        workers = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and workers, "the build ended before it could be killed"

    res = build(photo_dir, out)  # at once: no "in use by another build-dataset run (pid ...)"
    assert res.built + res.skipped == len([p for p in photo_dir.rglob("*") if p.is_file()])
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers)
    assert "Traceback" not in err.read_text(), err.read_text()
