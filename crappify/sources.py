"""Dataset sources: find the photos in a source layout and give each an id and a split.

Layouts (auto-detected, or named with `--source`), documented in data/README.md:
- `folder`: any folder, searched recursively for image files; seeded ratio split.
- `flickr30k`: `flickr30k_images/` (Kaggle's doubled `flickr30k_images/flickr30k_images/` too), optional
  `results.csv` captions (`image_name| comment_number| comment`); seeded ratio split.
- `celeba`: `img_align_celeba/` plus `list_eval_partition.txt` (or Kaggle's `.csv`) → the official
  train/valid/test split.
- `celeba-hq`: a folder of images (`CelebA-HQ-img/` inside CelebAMask-HQ is found too); seeded ratio split.
- `samples`: real photos that installed packages ship (scikit-image, scikit-learn, matplotlib), for the
  demo and tests; no download.

Symlinks: a linked photo is listed under its link's name (the builder reads and links its target); a linked
folder is walked like a folder, each real folder once. Never listed: hidden entries, a folder holding the
dataset marker (a dataset this tool built: its own outputs must never come back as photos), the folders
given as `exclude` (the build's OUT), and names that cannot be ids (`id_problem`), which are skipped with
the reason.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crappify.errors import CrappifyError
from crappify.imageio import IMAGE_EXTENSIONS
from crappify.registry import Registry

SPLITS = ("train", "valid", "test")
DATASET_MARKER = ".crappify-dataset"  # in every folder build-dataset writes (crappify.builder.MARKER)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def id_problem(item_id: str) -> str | None:
    """Why `item_id` cannot be a dataset item's id, or None. The one rule, applied where ids are made (listing:
    such a photo is skipped) and where they are read (`srgan.data`), so an id a build accepts is accepted
    everywhere: '/'-separated parts, none empty, '.' or '..'; no backslash (a separator on Windows); no
    control character (CR or LF would break a CSV row or a one-line message); text that UTF-8 can write
    (manifest.csv is UTF-8; a file name in another encoding cannot be)."""
    if any(p in ("", ".", "..") for p in item_id.split("/")):
        return "is not a relative name (an empty, '.' or '..' part)"
    if "\\" in item_id:
        return "holds a backslash"
    if _CONTROL.search(item_id):
        return "holds a control character (such as a line break)"
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def printable(name: str) -> str:
    """`name` as UTF-8 text on one line, for a report: undecodable bytes and control characters as \\xNN."""
    try:
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", name)


@dataclass(frozen=True)
class Item:
    """One source photo: a stable id (output name without extension), its path and split."""

    id: str
    source: str  # path relative to the source root (what the manifest shows)
    path: Path
    split: str = ""
    caption: str = ""


@dataclass
class Listing:
    items: list[Item]
    skipped: list[tuple[str, str]]  # (source, reason)
    official_split: bool
    excluded: list[str] = field(default_factory=list)  # folders not listed: datasets (the marker) or `exclude`


Lister = Callable[..., Listing]  # (src, exclude=frozenset()) -> Listing; exclude: real paths of folders to leave out
SOURCES: Registry[Lister] = Registry("source")


def _walk(root: Path, base: Path, ignore: frozenset[str] = frozenset(),
          exclude: frozenset[str] = frozenset()) -> Listing:
    """Image files under `root` (recursive, hidden entries ignored), ids relative to `root`. Folders in
    `exclude` (real paths) and folders holding the dataset marker are not entered (see the module docstring)."""
    items, skipped, excluded = [], [], []
    seen: set[str] = set()  # real paths of folders walked: a symlink loop is followed once
    root_s = os.fspath(root)
    # Ids and sources are cut from plain strings: pathlib costs ~40 µs a file here, which shows on a
    # 30k-photo listing (and on a 2000-photo benchmark, where listing is serial work before the pool).
    base_rel = os.path.relpath(root_s, os.fspath(base)).replace(os.sep, "/")
    base_prefix = "" if base_rel == "." else base_rel + "/"
    for dirpath, dirnames, filenames in os.walk(root_s, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        rel_dir = os.path.relpath(dirpath, root_s).replace(os.sep, "/")
        if real in exclude or DATASET_MARKER in filenames:
            excluded.append(printable(base_prefix + rel_dir if rel_dir != "." else base_rel))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in sorted(filenames):
            if name.startswith(".") or name in ignore:
                continue
            stem, ext = os.path.splitext(name)
            source = base_prefix + prefix + name
            if ext.lower() not in IMAGE_EXTENSIONS:
                skipped.append((printable(source), f"not an image file (extension {printable(ext) or 'none'})"))
                continue
            problem = id_problem(prefix + stem)
            if problem is not None:
                skipped.append((printable(source), f"file name cannot name a dataset item: it {problem}"))
                continue
            items.append(Item(prefix + stem, source, Path(dirpath, name)))
    return Listing(_unique_ids(items), skipped, official_split=False, excluded=excluded)


def _unique_ids(items: list[Item]) -> list[Item]:
    """Make ids unique: files differing only by extension (a.jpg, a.png) get it folded in (a_jpg, a_png).

    Ids that would still clash (a.jpg and a.JPG; b.jpg, b.png and b_jpg.png) get the extension as
    written, then a counter, in sorted order of their source paths, so the result is deterministic.
    Output folders may be case-insensitive, so ids are compared without case.
    """
    counts: dict[str, int] = {}
    for it in items:
        counts[it.id.lower()] = counts.get(it.id.lower(), 0) + 1
    used = {it.id.lower() for it in items if counts[it.id.lower()] == 1}
    out = []
    for it in sorted(items, key=lambda i: i.source):
        if counts[it.id.lower()] == 1:
            out.append(it)
            continue
        ext = it.path.suffix.lstrip(".")
        candidates = [f"{it.id}_{ext.lower()}", f"{it.id}_{ext}"]
        new = next((c for c in candidates if c.lower() not in used), None)
        n = 2
        while new is None or new.lower() in used:
            new, n = f"{it.id}_{ext.lower()}_{n}", n + 1
        used.add(new.lower())
        out.append(Item(new, it.source, it.path, it.split, it.caption))
    return out


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}


@SOURCES.register("folder")
def list_folder(src: Path, exclude: frozenset[str] = frozenset()) -> Listing:
    """A folder of photos; one holding `train/` and `valid/` (or `val/`) and/or `test/` sub-folders
    keeps that split (images outside them are skipped), any other is split by a seeded ratio."""
    folders = {name: SPLIT_FOLDERS[name] for name in SPLIT_FOLDERS if (src / name).is_dir()}
    if "train" not in folders or len(set(folders.values())) < 2:
        return _walk(src, src, exclude=exclude)
    listing = _walk(src, src, exclude=exclude)
    items, skipped = [], list(listing.skipped)
    for it in listing.items:
        split = folders.get(it.id.split("/", 1)[0]) if "/" in it.id else None
        if split is None:
            skipped.append((it.source, "outside the train/valid/test folders"))
        else:
            items.append(Item(it.id, it.source, it.path, split, it.caption))  # ids keep the folder: unique
    return Listing(items, skipped, official_split=True, excluded=listing.excluded)


@SOURCES.register("flickr30k")
def list_flickr30k(src: Path, exclude: frozenset[str] = frozenset()) -> Listing:
    images = src / "flickr30k_images"
    if (images / "flickr30k_images").is_dir():
        images = images / "flickr30k_images"
    if not images.is_dir():
        raise CrappifyError(f"{src} is not a Flickr30k folder: expected {src / 'flickr30k_images'}/")
    captions_file = _first_existing(src / "results.csv", images / "results.csv", images.parent / "results.csv")
    captions: dict[str, str] = {}
    if captions_file is not None:
        with open(captions_file, newline="", encoding="utf-8", errors="replace") as fh:
            for row in csv.reader(fh, delimiter="|"):
                if len(row) >= 3 and row[1].strip() == "0":
                    captions[row[0].strip()] = row[2].strip()
    listing = _walk(images, src, ignore=frozenset({"results.csv"}), exclude=exclude)
    listing.items = [Item(it.id, it.source, it.path, caption=captions.get(it.path.name, "")) for it in listing.items]
    return listing


@SOURCES.register("celeba")
def list_celeba(src: Path, exclude: frozenset[str] = frozenset()) -> Listing:
    images = src / "img_align_celeba"
    if (images / "img_align_celeba").is_dir():
        images = images / "img_align_celeba"
    part_file = _first_existing(src / "list_eval_partition.txt", src / "list_eval_partition.csv",
                                src / "Eval" / "list_eval_partition.txt")
    if not images.is_dir() or part_file is None:
        raise CrappifyError(f"{src} is not a CelebA folder: expected img_align_celeba/ and list_eval_partition.txt")
    partition: dict[str, str] = {}
    with open(part_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.replace(",", " ").split()
            if len(parts) == 2 and parts[1] in ("0", "1", "2"):
                partition[parts[0]] = SPLITS[int(parts[1])]
    listing = _walk(images, src, exclude=exclude)
    items = []
    for it in listing.items:
        split = partition.get(it.path.name)
        if split is None:
            listing.skipped.append((it.source, f"not listed in {part_file.name}"))
        else:
            items.append(Item(it.id, it.source, it.path, split))
    return Listing(items, listing.skipped, official_split=True, excluded=listing.excluded)


@SOURCES.register("celeba-hq")
def list_celeba_hq(src: Path, exclude: frozenset[str] = frozenset()) -> Listing:
    root = _first_existing(src / "CelebA-HQ-img", src / "celeba_hq", src / "CelebA-HQ") or src
    return _walk(root, src, exclude=exclude)


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (importing sklearn/skimage is slow)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


SAMPLE_PHOTOS = {
    "skimage": ("data", ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png",
                         "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg")),
    "sklearn": ("datasets/images", ("china.jpg", "flower.jpg")),
    "matplotlib": ("mpl-data/sample_data", ("grace_hopper.jpg",)),
}


def sample_photos() -> list[tuple[str, Path]]:
    """Real photos shipped inside installed packages, as (name, path); no download involved."""
    found = []
    for package, (sub, names) in SAMPLE_PHOTOS.items():
        base = _package_dir(package)
        if base is not None:
            found += [(f"{package}/{n}", base / sub / n) for n in names if (base / sub / n).is_file()]
    return found


def sample_id(name: str) -> str:
    """Item id of a sample photo ('skimage/astronaut.png' -> 'skimage-astronaut')."""
    return name.rsplit(".", 1)[0].replace("/", "-")


@SOURCES.register("samples")
def list_samples(src: Path, exclude: frozenset[str] = frozenset()) -> Listing:
    photos = sample_photos()
    if not photos:
        raise CrappifyError("no sample photos found: install scikit-image, scikit-learn or matplotlib")
    items = [Item(sample_id(name), name, path) for name, path in photos]
    return Listing(items, [], official_split=False)


def detect(src: Path) -> str:
    """Name of the layout `src` looks like."""
    if str(src) == "samples" and not src.exists():
        return "samples"
    if (src / "img_align_celeba").is_dir():
        return "celeba"
    if (src / "flickr30k_images").is_dir():
        return "flickr30k"
    key = src.name.lower().replace("-", "").replace("_", "")
    if "celebahq" in key or (src / "CelebA-HQ-img").is_dir():
        return "celeba-hq"
    return "folder"


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Items per split for a ratio split; a split with a non-zero ratio gets at least one item when n >= 3."""
    _, rv, rt = ratios
    n_valid = round(n * rv)
    n_test = round(n * rt)
    if n >= 3:
        n_valid = max(n_valid, 1 if rv > 0 else 0)
        n_test = max(n_test, 1 if rt > 0 else 0)
    n_valid = min(n_valid, n)
    n_test = min(n_test, n - n_valid)
    return n - n_valid - n_test, n_valid, n_test


def assign_splits(items: list[Item], ratios: tuple[float, float, float], seed: int) -> list[Item]:
    """Seeded ratio split: a permutation of the (sorted) items, cut by `split_counts`."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(items))
    _, n_valid, n_test = split_counts(len(items), ratios)
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[int(idx)] = "valid" if rank < n_valid else "test" if rank < n_valid + n_test else "train"
    return [Item(it.id, it.source, it.path, split_of[i], it.caption) for i, it in enumerate(items)]


def limit_items(items: list[Item], limit: int) -> list[Item]:
    """The first `limit` items, taken from every split in proportion (each split sorted by id)."""
    by_split: dict[str, list[Item]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    keyed = []
    for split, group in by_split.items():
        for rank, it in enumerate(group):
            keyed.append(((rank + 0.5) / len(group), SPLITS.index(split) if split in SPLITS else 3, it))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return sorted((k[2] for k in keyed[:limit]), key=lambda it: it.id)


def list_source(src: Path, kind: str = "auto", seed: int = 0,
                ratios: tuple[float, float, float] = (0.9, 0.05, 0.05),
                limit: int | None = None, exclude: Iterable[str | Path] = ()) -> tuple[str, Listing]:
    """List a source's photos with ids and splits; returns (layout name, listing). `exclude`: folders never to
    list (a build's OUT, when it lies inside the source); folders holding the dataset marker are never listed."""
    if kind == "auto":
        kind = detect(src)
    lister = SOURCES.get(kind)
    if kind != "samples" and not src.is_dir():
        raise CrappifyError(f"source folder not found: {src}")
    skip = frozenset(os.path.realpath(p) for p in exclude)
    if kind != "samples" and os.path.realpath(src) in skip:
        raise CrappifyError(f"source folder {src} is the output folder too; give another output folder")
    if kind != "samples" and (src / DATASET_MARKER).is_file():
        raise CrappifyError(f"source folder {src} is a dataset this tool built (it holds {DATASET_MARKER}); give "
                            f"a folder of photos (e.g. {src / 'hr' / 'train'})")
    listing = lister(src, exclude=skip) if skip else lister(src)
    items = sorted(listing.items, key=lambda it: it.id)
    if listing.official_split:
        if limit is not None:
            items = limit_items(items, limit)
    else:
        if limit is not None:
            items = items[:limit]
        items = assign_splits(items, ratios, seed)
    listing.items = items
    listing.skipped.sort()
    return kind, listing


SourceName = SOURCES.name_type("auto")
"""A config field naming a source layout: a registered one, or "auto" (detected)."""
