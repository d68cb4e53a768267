"""`merge-datasets`: join the parts of a dataset built with `build-dataset --shard K/N` (on several machines,
e.g. by a Slurm job array or a Kubernetes indexed Job) into the dataset one machine would have built, byte for
byte.

Which items a part holds is `crappify.builder`'s rule (round-robin over the whole build's listing, see its
docstring). A part's config.yaml is a whole build's plus a `shard:` record (K, N and a fingerprint of the whole
listing); its rows and files are exactly the whole build's for its items. So the merge:

1. checks the parts before it writes anything: each is a finished part (config.yaml with a `shard:` record,
   manifest.csv and skipped.csv, no journal of a build still running or killed); all have the same N, the same
   config less `shard:` (library versions included: they decide the bytes) and the same listing; every shard
   1..N is given exactly once; no id or file is in two parts, and every file a row names is in its part. Any
   failure is one line naming the offending part: `ConfigError` when the parts given do not make one dataset,
   `CrappifyError` when a part or OUT cannot be used;
2. writes OUT in the order a build does, each file atomically (temporary name, then rename): the marker,
   config.yaml (the parts' config less `shard:`, written by the builder's own `config_text`), every file under
   hr/ and lr/ hard-linked from its part (copied across filesystems; never re-encoded), and last manifest.csv
   (the parts' rows in the listing's order, which is by id) and skipped.csv (through the builder's
   `write_tables`).

A part's files are read as the builder reads photos: only the hr/ and lr/ files its manifest lists, each a
regular file (not a symlink, FIFO or device) within a size cap (the build's --max-bytes, or what the row's
pixel size allows), and its config.yaml, manifest.csv and skipped.csv only when they are regular files within a
cap; anything else in a part is never opened, linked or copied.

OUT must be new, empty, or already hold this very dataset (its config.yaml is the text the merge writes: an
interrupted or finished merge of the same parts); anything else is refused and left untouched. Files already in
OUT with the right bytes are kept, so running a merge again does no work twice. OUT is locked while the merge
writes, as a build locks its OUT.
"""

from __future__ import annotations

import csv
import filecmp
import io
import json
import os
import stat
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crappify.builder import (
    IGNORED_NAMES,
    JOURNAL,
    MANIFEST_COLUMNS,
    MARKER,
    MARKER_TEXT,
    PART_KEY,
    SKIPPED_COLUMNS,
    config_text,
    write_tables,
)
from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import DEFAULT_MAX_BYTES, ImageError, read_source, replacing, write_atomic
from crappify.runlock import clean_stale_temps, folder_lock
from crappify.sources import SPLITS
from crappify.yamlfile import safe_load

CONFIG_MAX_BYTES = 1 << 20  # a dataset's config.yaml is a few KiB
TABLE_MAX_BYTES = 1 << 30  # manifest.csv / skipped.csv: ~1 KiB a row, so a million rows fit


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of `path`, a regular file (symlinks followed) of at most `cap` bytes: FIFOs and devices (a
    link to /dev/zero) are refused before they are opened for reading. OSError or ImageError (the reason)."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode) and st.st_size > cap:
        raise ImageError(f"{st.st_size} bytes, more than the {cap} such a file can have")
    return read_source(path, cap)


@dataclass
class Part:
    """One part as found on disk: its folder, which shard it is, and its config less the `shard:` record."""

    path: Path
    index: int
    count: int
    listing: str
    config: dict[str, Any]
    rows: list[dict[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # relative posix path -> the part's file
    caps: dict[str, int] = field(default_factory=dict)  # relative posix path -> the most bytes it may have

    @property
    def shard(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class MergeResult:
    out: Path
    parts: int
    built: int
    skipped: int
    linked: int  # files hard-linked from a part
    copied: int  # files copied from a part on another filesystem
    kept: int  # files OUT already held with the right bytes (an earlier merge)
    per_split: dict[str, int]


def read_part(path: str | Path) -> Part:
    """A finished part's shard record and config (rows and files are read by `load_part`); one-line errors."""
    path = Path(path)
    if not path.is_dir():
        raise CrappifyError(f"part {path} is not a folder")
    try:
        config = safe_load(read_capped(path / "config.yaml", CONFIG_MAX_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise CrappifyError(f"part {path} is not a dataset (it has no config.yaml)") from None
    except ImageError as exc:
        if str(exc).startswith("file not found"):
            raise CrappifyError(f"part {path} is not a dataset (it has no config.yaml)") from None
        raise CrappifyError(f"part {path}: cannot read its config.yaml ({exc})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CrappifyError(f"part {path}: cannot read its config.yaml ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise CrappifyError(f"part {path}: its config.yaml is not a dataset config (not a YAML mapping)")
    record = config.pop(PART_KEY, None)
    if record is None:
        raise ConfigError(f"{path} is not a part of a sharded build (its config.yaml has no shard:); build each "
                          "part with build-dataset --shard K/N")
    index, count, listing = (record.get(k) for k in ("index", "count", "listing")) if isinstance(record, dict) \
        else (None, None, None)
    if type(index) is not int or type(count) is not int or not 1 <= index <= count or not isinstance(listing, str):
        raise CrappifyError(f"part {path}: the shard: record in its config.yaml is not one a build writes")
    part = Part(path, index, count, listing, config)
    if (path / JOURNAL).exists() or not (path / "manifest.csv").is_file() or not (path / "skipped.csv").is_file():
        raise CrappifyError(f"part {path} (shard {part.shard}) is not finished: run its build-dataset command "
                            "again to finish it, then merge")
    return part


def _most_common(parts: list[Part], key: Callable[[Part], Hashable]) -> Part:
    """The first part whose key most parts share (the reference the odd one out is named against)."""
    value = Counter(key(p) for p in parts).most_common(1)[0][0]
    return next(p for p in parts if key(p) == value)


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ (a mapping's own keys for `versions`, which are short and telling)."""
    out = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key == "versions" and isinstance(va, dict) and isinstance(vb, dict):
            out += [f"versions.{k}" for k in dict.fromkeys([*va, *vb]) if va.get(k) != vb.get(k)]
        else:
            out.append(key)
    return out


def check_parts(parts: list[Part]) -> None:
    """That the parts make one dataset: no folder twice, one N, one config, one listing, each shard once and
    none missing. `ConfigError` naming the offending part (the odd one out against what most parts share)."""
    if not parts:
        raise ConfigError("no parts to merge")
    folders: dict[Path, Part] = {}
    for part in parts:
        key = part.path.resolve()
        if key in folders:
            raise ConfigError(f"part {part.path} is given twice")
        folders[key] = part
    ref = _most_common(parts, lambda p: p.count)
    for part in parts:
        if part.count != ref.count:
            raise ConfigError(f"part {part.path} is shard {part.shard}, but part {ref.path} is {ref.shard}: the "
                              "parts of one build share N")
    ref = _most_common(parts, lambda p: _canonical(p.config))
    for part in parts:
        changed = _differences(ref.config, part.config)
        if changed:
            raise ConfigError(f"part {part.path} was built with another config than part {ref.path} (differs in: "
                              f"{', '.join(changed)}); only the shard may differ between parts")
    ref = _most_common(parts, lambda p: p.listing)
    for part in parts:
        if part.listing != ref.listing:
            raise ConfigError(f"part {part.path} was cut from another listing of the source than part {ref.path} "
                              "(the source changed between their builds); build it again")
    by_index: dict[int, Part] = {}
    for part in parts:
        if part.index in by_index:
            raise ConfigError(f"part {part.path} is shard {part.shard}, as is part {by_index[part.index].path}: "
                              "give each shard once")
        by_index[part.index] = part
    n = parts[0].count
    missing = [k for k in range(1, n + 1) if k not in by_index]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"shard {missing[0]}/{n} is missing{more}: give all {n} parts")


def _read_csv(part: Part, name: str, columns: list[str]) -> list[dict[str, str]]:
    try:
        text = read_capped(part.path / name, TABLE_MAX_BYTES).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames != columns:
            raise CrappifyError(f"part {part.path}: {name} does not have a dataset's columns")
        return list(reader)
    except (OSError, ImageError, UnicodeDecodeError, csv.Error) as exc:
        raise CrappifyError(f"part {part.path}: cannot read {name} ({exc})") from None


def _file_cap(part: Part, row: dict[str, str], column: str) -> int:
    """The most bytes a file of a row can have: the build's --max-bytes (an HR that is the source's own bytes),
    or twice the raw size of the row's pixels (a PNG or JPEG the build encoded), whichever is more."""
    max_bytes = part.config.get("max_bytes")
    cap = max_bytes if type(max_bytes) is int else DEFAULT_MAX_BYTES
    try:
        pixels = int(row[f"{column}_width"]) * int(row[f"{column}_height"])
    except (KeyError, TypeError, ValueError):
        return cap
    return max(cap, 6 * pixels + (1 << 20))


def load_part(part: Part) -> None:
    """Read a part's rows, skips and files: the hr/ and lr/ files its manifest lists, nothing else (not an
    extra file, link or FIFO someone left beside them). A part missing such a file, or holding one that is
    not a regular file within the cap (`_file_cap`), is refused (its build, run again, rebuilds it)."""
    part.rows = _read_csv(part, "manifest.csv", MANIFEST_COLUMNS)
    part.skipped = [(r["source"], r["reason"]) for r in _read_csv(part, "skipped.csv", SKIPPED_COLUMNS)]
    for row in part.rows:
        for column in ("hr", "lr"):
            rel = row[column]
            path = part.path / rel
            if rel.split("/", 1)[0] != column or ".." in rel.split("/") or "\\" in rel:
                raise CrappifyError(f"part {part.path}: its manifest lists {rel!r}, not a file a build writes")
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise CrappifyError(f"part {part.path} lacks {rel}, which its manifest lists: run its "
                                    "build-dataset command again to rebuild it, then merge") from None
            except OSError as exc:
                raise CrappifyError(f"part {part.path}: cannot read {rel} ({exc.strerror or exc})") from None
            cap = _file_cap(part, row, column)
            if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
                what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"{st.st_size} bytes, too large"
                raise CrappifyError(f"part {part.path}: {rel} is {what}, not a file a build writes: run its "
                                    "build-dataset command again to rebuild it, then merge")
            part.files[rel], part.caps[rel] = path, cap


def _check_disjoint(parts: list[Part]) -> None:
    """No id, skipped file or output file in two parts (parts of one build never overlap)."""
    kinds: list[tuple[str, Callable[[Part], Iterable[str]]]] = [
        ("id", lambda p: (r["id"] for r in p.rows)), ("skipped file", lambda p: (s for s, _ in p.skipped)),
        ("file", lambda p: p.files)]
    for what, keys in kinds:
        owner: dict[str, Part] = {}
        for part in parts:
            for key in keys(part):
                if key in owner:
                    raise ConfigError(f"part {part.path} holds {what} {key}, as does part {owner[key].path}: "
                                      "the parts overlap")
                owner[key] = part


def _holds_this_dataset(out: Path, text: str) -> bool:
    """Whether OUT may be written: new, empty (a lock or marker alone counts as empty), or holding the marker
    and exactly this config.yaml (an interrupted or finished merge of the same parts)."""
    if not out.is_dir():
        return True
    names = {p.name for p in out.iterdir()} - set(IGNORED_NAMES)
    if names <= {MARKER}:
        return True
    try:
        return (out / MARKER).is_file() and read_capped(out / "config.yaml", CONFIG_MAX_BYTES) == text.encode()
    except (OSError, ImageError):
        return False


def _same_file(src: Path, dst: Path) -> bool:
    """Whether dst already holds src's bytes (the same inode, or equal contents); both regular files."""
    try:
        a, b = os.lstat(src), os.lstat(dst)
    except OSError:
        return False
    if not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)):
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_size == b.st_size and filecmp.cmp(src, dst, shallow=False)


def _link_or_copy(src: Path, dst: Path, cap: int) -> bool:
    """Hard-link `src` (a regular file, checked by `load_part`) at `dst`, or copy it where links fail (another
    filesystem), reading at most `cap` bytes of a regular file; True when linked."""
    try:
        if os.path.lexists(dst):  # a wrong file an earlier merge left: swapped atomically
            with replacing(dst) as tmp:
                os.link(src, tmp)
        else:
            os.link(src, dst)
        return True
    except OSError:
        pass
    write_atomic(dst, read_source(src, cap))
    return False


def merge_datasets(parts: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Join the parts of a `build-dataset --shard K/N` build into OUT (see the module docstring)."""
    found = [read_part(p) for p in parts]
    check_parts(found)
    for part in found:
        load_part(part)
    _check_disjoint(found)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CrappifyError(f"output path exists and is not a folder: {out}")
    text = config_text(found[0].config)
    with folder_lock(out, "merge-datasets run"):
        if not _holds_this_dataset(out, text):
            raise CrappifyError(f"output folder {out} is not empty and does not hold a merge of these parts; "
                                "choose a new or empty folder")
        try:
            return _write(found, out, text)
        except OSError as exc:  # disk full, permissions: nothing is half-written, a rerun goes on
            where = exc.filename if exc.filename is not None else out
            raise CrappifyError(f"cannot write to {where}: {exc.strerror or exc}") from None


def _write(parts: list[Part], out: Path, text: str) -> MergeResult:
    clean_stale_temps(out, recursive=True)  # left by a killed merge (the lock says no one else writes here)
    if not (out / MARKER).is_file():
        write_atomic(out / MARKER, MARKER_TEXT)
    if not (out / "config.yaml").is_file():
        write_atomic(out / "config.yaml", text)
    linked = copied = kept = 0
    made: set[Path] = set()
    for rel, src, cap, folder in sorted((rel, src, p.caps[rel], p.path) for p in parts for rel, src in p.files.items()):
        dst = out / rel
        if dst.parent not in made:
            dst.parent.mkdir(parents=True, exist_ok=True)
            made.add(dst.parent)
        try:
            if _same_file(src, dst):
                kept += 1
            elif _link_or_copy(src, dst, cap):
                linked += 1
            else:
                copied += 1
        except ImageError as exc:  # swapped for a FIFO, device or larger file since it was checked
            raise CrappifyError(f"part {folder}: cannot copy {rel} ({exc})") from None
    rows = sorted((row for part in parts for row in part.rows), key=lambda r: r["id"])
    skipped = [s for part in parts for s in part.skipped]
    write_tables(out, rows, skipped)
    (out / JOURNAL).unlink(missing_ok=True)  # no build of this dataset is running (OUT is locked): obsolete
    per_split = {s: sum(1 for r in rows if r["split"] == s) for s in SPLITS}
    return MergeResult(out, len(parts), len(rows), len(skipped), linked, copied, kept, per_split)
