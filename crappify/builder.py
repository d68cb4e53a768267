"""`build-dataset`: turn a source of clean photos into aligned HR/LR pairs on disk.

Output layout (what training reads):

    OUT/config.yaml      resolved config (preset inlined) and library versions
    OUT/manifest.csv     one row per pair: id, split, source, hr, lr, seed, sizes, caption, params (JSON)
    OUT/skipped.csv      source, reason — every file that could not be used
    OUT/hr/<split>/<id>.<ext>   the clean target (the source's own bytes when nothing changed)
    OUT/lr/<split>/<id>.<ext>   the degraded input (.jpg holding the exact encoded bytes when the last
                                 applied op is JPEG, else lossless .png)

Every item's randomness comes from a seed derived from the global seed and the item's id, so the
result is byte-identical for any worker count and completion order. Files are written under
temporary names and renamed; finished items are journaled, so a killed run resumes where it stopped.
Images are not fsynced (that would cost more than rebuilding them): a resumed build checks every file its
journal or manifest lists (non-empty, header parses, the recorded size, its end present) and rebuilds those
that fail, e.g. after a power loss.

A file that is the photo's fault (corrupt, truncated, not an image, a bomb, a FIFO, over --max-bytes, a name
that cannot be an id: `crappify.sources.id_problem`) is skipped and listed in skipped.csv; one the system
could not read (permissions, I/O errors, too many open files, out of memory) stops the run with one line naming
it, and is tried again when the run is resumed. So does a full disk or a read-only OUT.

A symlinked photo's HR is its target's bytes (hard-linked or copied): every file the manifest names is a regular
file inside OUT. OUT, and any folder holding the marker below, is never listed as source, even inside SRC.

OUT/.crappify-dataset marks a folder this tool built: only such a folder may be cleared by --overwrite.

Datasets across machines: `--shard K/N` builds only part K of N. The rule: the whole build's listing (sorted by
id, after --limit and the split) is dealt round-robin, the item at position i (0-based) going to part
(i mod N) + 1, and so are the files skipped while listing (not images, outside the split folders), by their
position in the sorted list of those. Ids, splits and seeds come from the whole listing, so each part holds
exactly the files and rows the whole build has for its items; the N parts are disjoint and together hold
everything. A part is an ordinary (resumable) dataset whose config.yaml adds `shard:` (K, N and a fingerprint
of the whole listing, so that parts cut from different states of the source are not joined);
`crappify.merge` joins the parts into the dataset one machine would have built, byte for byte.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import cv2
import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from crappify import __version__
from crappify.chain import Chain, load_preset
from crappify.errors import ConfigError, CrappifyError
from crappify.functional import jpeg_decode, resize
from crappify.imageio import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageError,
    Photo,
    ReadError,
    encode,
    file_intact,
    link_or_copy_atomic,
    write_atomic,
)
from crappify.parallel import parallel_map
from crappify.runlock import clean_stale_temps, folder_lock
from crappify.sources import DATASET_MARKER, SPLITS, Item, Listing, SourceName, list_source
from crappify.yamlfile import safe_load

DEFAULT_SCALE = 4
JOURNAL = ".journal.jsonl"
JOURNAL_FLUSH_S = 0.25  # how often finished items reach the journal file
MANIFEST_COLUMNS = ["id", "split", "source", "hr", "lr", "seed", "hr_width", "hr_height", "lr_width",
                    "lr_height", "caption", "params"]
OUTPUT_FILES = ("config.yaml", "manifest.csv", "skipped.csv", JOURNAL)
OUTPUT_DIRS = ("hr", "lr")
MARKER = DATASET_MARKER  # written first into every OUT this tool builds: --overwrite clears only those
MARKER_TEXT = ("This folder is a dataset built by `crappify build-dataset`; `--overwrite` may delete its hr/, lr/,\n"
               "config.yaml, manifest.csv and skipped.csv. Remove this file to protect the folder from that.\n")
IGNORED_NAMES = (".lock",)  # a lock file alone does not make a folder non-empty
# Keys added to config.yaml after datasets were already built with it: an older config.yaml without them was
# built with the value below (no byte cap then; today's default is the closest).
LATER_KEYS = {"max_bytes": DEFAULT_MAX_BYTES}
# Skip reasons that earlier versions recorded for what was not the file's fault (or a file that may be back):
# tried again on resume.
RETRIED_REASONS = ("file not found", "permission denied", "corrupt or truncated image: [Errno")
PART_KEY = "shard"  # config.yaml key of a part built with --shard K/N; a whole build's config has none
# Keys written to config.yaml (and a stage's dump) only when set, so a build without them keeps its bytes and hash.
OPTIONAL_KEYS = (PART_KEY, "square")
SKIPPED_COLUMNS = ["source", "reason"]


def parse_shard(value: object) -> tuple[int, int]:
    """(K, N) from a `--shard` value "K/N" with 1 <= K <= N; ValueError saying what is expected otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value, re.ASCII) if isinstance(value, str) else None
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError("expected K/N with 1 <= K <= N, e.g. 2/8 for the second of 8 parts")
    return int(match[1]), int(match[2])


MAX_SQUARE = 8192  # `square` upscales: bounded (CelebA-HQ's photos are 1024 px)


class BuildConfig(BaseModel):
    """Options of `crappify build-dataset` (also the keys of its `--config` YAML file)."""

    model_config = ConfigDict(extra="forbid")

    src: str = Field(description="source folder, or 'samples' for the photos installed packages ship")
    out: str
    source: SourceName = Field("auto", description="the source's layout; auto: detected")
    preset: str = "flickr30k-restore"
    size: int | None = Field(None, ge=8, description="HR short side in px (never upscaled)")
    square: int | None = Field(None, ge=8, le=MAX_SQUARE,
                               description="HR squashed to exactly N x N px (bicubic, aspect not kept, upscaled where "
                                           "smaller); instead of size")
    scale: int | None = Field(None, ge=1, le=16, description="HR/LR ratio where the preset does not fix it")
    seed: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="skip files larger than this, before reading them")
    hr_format: Literal["png", "jpg"] = "png"
    link_hr: bool = Field(True, description="hard-link unchanged HR files to the source instead of copying")
    workers: int = Field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 16)), ge=1, le=256)
    shard: str | None = Field(None, description="K/N: build only part K of N disjoint parts of the source "
                                                "(joined by `crappify merge-datasets`)")

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave `max_bytes` out of dumps while it has its default: it came after datasets and pipelines were
        built, and `crappify run` hashes a stage's dump, so listing it would re-run every existing pipeline's
        stages for an option nobody set. `shard` and `square` likewise while they are unset."""
        data = handler(self)
        if data.get("max_bytes") == DEFAULT_MAX_BYTES:
            del data["max_bytes"]
        for key in OPTIONAL_KEYS:
            if data.get(key, "") is None:
                del data[key]
        return data

    @field_validator("square")
    @classmethod
    def _square_or_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        """Two ways to size the HR: one only, so a config never says two things."""
        if v is not None and info.data.get("size") is not None:
            raise ValueError("square and size are mutually exclusive (square: the HR is exactly N x N; size: its "
                             "short side); set only one")
        return v

    @field_validator("shard", mode="before")
    @classmethod
    def _shard_is_k_of_n(cls, v: Any) -> str | None:
        """Checked once here, so a bad value is a one-line config error before anything is listed."""
        if v is None:
            return None
        k, n = parse_shard(v)
        return f"{k}/{n}"

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("train, valid, test ratios must be >= 0 and sum to 1")
        return v


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to process items (sent to each worker process once)."""

    out: Path
    chain: Chain
    size: int | None
    scale: int | None
    seed: int
    max_pixels: int
    hr_format: str
    link_hr: bool
    max_bytes: int = DEFAULT_MAX_BYTES
    square: int | None = None


@dataclass
class BuildResult:
    out: Path
    built: int
    skipped: int
    reused: int
    seconds: float
    per_split: dict[str, int]


Needs = Sequence[tuple[tuple[str, ...], str]]  # (splits any of which will do, who needs them) per requirement


def check_built(res: BuildResult, cfg: BuildConfig, needs: Needs = ()) -> None:
    """The one rule for a build that made nothing usable, for every caller (`build-dataset`, `crappify run`):
    no pairs at all, or none in a split that a later step needs (`needs`: the splits any of which will do, and
    who needs them), is a one-line CrappifyError naming the dataset's skipped.csv. A part (--shard) may be
    empty: the merge judges the whole dataset."""
    if cfg.shard is not None:
        return
    where = f"{res.skipped} file(s) skipped (see {res.out / 'skipped.csv'})"
    if res.built == 0:
        raise CrappifyError(f"no pairs could be built from {cfg.src}: {where}")
    for splits, who in needs:
        if not any(res.per_split.get(split) for split in splits):
            counts = " / ".join(f"{k} {v}" for k, v in res.per_split.items())
            raise CrappifyError(f"dataset {res.out} has no {' or '.join(splits)} pairs, which {who} needs "
                                f"(built {counts}); {where}")


def item_seed(seed: int, item_id: str) -> int:
    """Per-item seed from the global seed and the item's id (63 bits, so it is exact in CSV and JSON)."""
    digest = hashlib.blake2b(f"{seed}\0{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def effective_scale(chain: Chain, scale: int | None) -> int | None:
    """The dataset's HR/LR ratio: the preset's if it fixes one, else --scale (default 4)."""
    if not chain.uses_lr_size:
        if scale is not None:
            raise ConfigError(f"preset {chain.name!r} resizes to a fixed size, so --scale does not apply to it")
        return None
    if chain.scale is not None:
        if scale is not None and scale != chain.scale:
            raise ConfigError(f"preset {chain.name!r} fixes scale {chain.scale}; got --scale {scale}")
        return chain.scale
    return scale or DEFAULT_SCALE


def hr_geometry(w: int, h: int, size: int | None, scale: int | None,
                square: int | None = None) -> tuple[int, int, int, int]:
    """(resized width, height, cropped width, height) of the HR for a w×h upright source: short side to `size`,
    or both sides to `square`; then cropped to a multiple of the scale."""
    if square is not None:
        w = h = square
    elif size is not None:
        short = min(w, h)
        w, h = (size, max(1, round(h * size / short))) if w <= h else (max(1, round(w * size / short)), size)
    cw, ch = (w - w % scale, h - h % scale) if scale else (w, h)
    return w, h, cw, ch


def center_crop(img: np.ndarray, cw: int, ch: int) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]


def make_hr(pixels: np.ndarray, rw: int, rh: int, cw: int, ch: int, bicubic: bool = False) -> np.ndarray:
    """Resize (pixel-area average; `bicubic` for a squashed, maybe upscaled HR, as torchvision's Resize) to rw×rh
    where needed, then centre-crop to cw×ch."""
    if (pixels.shape[1], pixels.shape[0]) != (rw, rh):
        pixels = (resize(pixels, rw, rh, "bicubic") if bicubic
                  else cv2.resize(pixels, (rw, rh), interpolation=cv2.INTER_AREA))
    return center_crop(pixels, cw, ch) if (cw, ch) != (rw, rh) else pixels


_MADE_DIRS: set[str] = set()  # per process: folders already created (saves a syscall per file)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if parent not in _MADE_DIRS:
        os.makedirs(parent, exist_ok=True)
        _MADE_DIRS.add(parent)


def process_item(item: Item, job: Job) -> dict[str, Any]:
    """Build one pair; returns a manifest row, or {"id", "skip": reason} when the file is unusable.

    Raises CrappifyError naming the file when it could not be read (ReadError) or memory ran out: those are
    not the file's fault, so it is not recorded as skipped, and a resumed run tries it again. Anything else
    is a bug: it keeps its traceback, with a note naming the file."""
    try:
        return _process_item(item, job)
    except ReadError as exc:
        raise CrappifyError(f"cannot read {item.path}: {exc}; fix that and run the same command again "
                            "to resume") from None
    except MemoryError:
        raise CrappifyError(f"out of memory while building {item.path}; run again with fewer --workers "
                            "(or a lower --max-pixels) to resume") from None
    except CrappifyError:
        raise
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"while building {item.path}")
        raise


def _process_item(item: Item, job: Job) -> dict[str, Any]:
    try:
        with Photo(item.path, job.max_pixels, job.max_bytes) as photo:
            w, h = photo.size
            if job.size is not None and min(w, h) < job.size:
                return {"id": item.id, "skip": f"smaller than --size {job.size} ({w}x{h})"}
            rw, rh, cw, ch = hr_geometry(w, h, job.size, job.scale, job.square)
            if cw < (job.scale or 1) or ch < (job.scale or 1):
                return {"id": item.id, "skip": f"too small for scale {job.scale} ({w}x{h})"}
            lr_size = (cw // job.scale, ch // job.scale) if job.scale else None
            copy_hr = photo.native and (rw, rh, cw, ch) == (w, h, w, h)
            need = job.square or job.size  # the HR is resized from the pixels decoded here, so the LR stays exact
            if copy_hr and job.chain.shrink_on_decode:  # the preset allows decoding near the first resize's size
                lead = job.chain.leading_size(w, h, lr_size)
                need = min(lead) if lead else None
            pixels, reduced = photo.pixels(need)
    except ReadError:
        raise
    except ImageError as exc:
        return {"id": item.id, "skip": str(exc)}
    hr_bytes = None
    if not copy_hr:
        hr = make_hr(pixels, rw, rh, cw, ch, bicubic=job.square is not None)
        hr_bytes = encode(hr, job.hr_format)
        if job.hr_format == "jpg":  # degrade the pixels the HR file holds, so params replay on it exactly
            hr = jpeg_decode(hr_bytes)
    else:
        hr = pixels

    seed = item_seed(job.seed, item.id)
    degraded = job.chain.run(np.ascontiguousarray(hr), np.random.default_rng(seed), lr_size, decode=False)
    if copy_hr and reduced > 1:
        degraded.record["reduced"] = reduced
    if degraded.encoded is not None:
        lr_bytes, lr_ext = degraded.encoded, ".jpg"
    else:
        lr_bytes, lr_ext = encode(degraded.image, "png"), ".png"
    lr_w, lr_h = degraded.size

    hr_rel = f"hr/{item.split}/{item.id}{photo.extension if copy_hr else '.' + job.hr_format}"
    lr_rel = f"lr/{item.split}/{item.id}{lr_ext}"
    hr_path, lr_path = f"{job.out}/{hr_rel}", f"{job.out}/{lr_rel}"  # plain strings: this is the hot loop
    try:
        _ensure_parent(hr_path)
        _ensure_parent(lr_path)
        if copy_hr and job.link_hr:
            # The target of a symlinked photo: a link to the symlink itself would dangle or lead outside OUT.
            link_or_copy_atomic(os.path.realpath(item.path), hr_path, photo.data)
        elif copy_hr:  # the source's own bytes, already in memory
            write_atomic(hr_path, photo.data)
        else:
            write_atomic(hr_path, hr_bytes)
        write_atomic(lr_path, lr_bytes)
    except OSError as exc:  # disk full, permissions: the run cannot go on, but nothing is half-written
        raise CrappifyError(f"cannot write to {job.out}: {exc.strerror or exc}") from None
    return {"id": item.id, "split": item.split, "source": item.source, "hr": hr_rel, "lr": lr_rel,
            "seed": seed, "hr_width": cw, "hr_height": ch, "lr_width": lr_w, "lr_height": lr_h,
            "caption": item.caption, "params": json.dumps(degraded.record, separators=(",", ":"))}


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would only contend


def versions() -> dict[str, str]:
    """Versions of what decides the output bytes (recorded in config.yaml)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"crappify": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
           "opencv": cv2.__version__}
    for dist in ("pillow", "albumentations"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def resolved_config(cfg: BuildConfig, layout: str, chain: Chain, scale: int | None) -> dict[str, Any]:
    """What identifies a dataset (saved as config.yaml). Worker count and linking are absent: they
    do not change a single byte of the output."""
    src = cfg.src if layout == "samples" else str(Path(cfg.src).resolve())
    square = {} if cfg.square is None else {"square": cfg.square}  # absent when unset: older bytes unchanged
    return {"src": src, "source": layout, "preset": chain.to_dict(), "size": cfg.size, **square, "scale": scale,
            "seed": cfg.seed, "limit": cfg.limit, "split": list(cfg.split), "max_pixels": cfg.max_pixels,
            "max_bytes": cfg.max_bytes, "hr_format": cfg.hr_format}


def config_text(config: dict[str, Any]) -> str:
    """config.yaml's text for a resolved config (with its versions): what a build writes, and what
    `crappify.merge` writes for joined parts, so the two agree byte for byte."""
    return yaml.safe_dump(config, sort_keys=False)


def listing_fingerprint(listing: Listing) -> str:
    """A digest of a whole listing (ids, splits, sources, captions, listing-time skips): recorded by each part,
    so that a merge refuses parts listed from different states of the source."""
    entries = [[it.id, it.split, it.source, it.caption] for it in listing.items]
    blob = json.dumps([entries, [list(s) for s in listing.skipped]], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def shard_listing(listing: Listing, shard: str) -> tuple[dict[str, Any], Listing]:
    """Part K of N of a whole build's listing (see the module docstring for the rule), and the record its
    config.yaml keeps under `shard:` (K, N and the whole listing's fingerprint)."""
    k, n = parse_shard(shard)
    record = {"index": k, "count": n, "listing": listing_fingerprint(listing)}
    return record, Listing(listing.items[k - 1::n], listing.skipped[k - 1::n], listing.official_split)


def csv_text(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    """CSV text (LF line ends, extra keys dropped) that readers split back into the same fields. Python's writer
    leaves a field holding a lone CR unquoted when lines end in LF, and readers split the row there; a row with
    a CR is written by a writer whose line end holds CR, which quotes it, and given an LF end again."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        if any("\r" in str(row.get(c, "")) for c in columns):
            one = io.StringIO()
            csv.DictWriter(one, fieldnames=columns, lineterminator="\r\n", extrasaction="ignore").writerow(row)
            buf.write(one.getvalue()[:-2] + "\n")
        else:
            writer.writerow(row)
    return buf.getvalue()


def write_tables(out: Path, rows: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> None:
    """Write manifest.csv (rows in listing order) and skipped.csv (sorted): the last files a build writes, and
    the ones `crappify.merge` writes the same way. A write that fails (disk full, read-only) is a one-line
    CrappifyError naming the file; nothing is half-written, and running the same command again finishes."""
    tables = [("manifest.csv", MANIFEST_COLUMNS, rows),
              ("skipped.csv", SKIPPED_COLUMNS, [{"source": s, "reason": r} for s, r in sorted(skipped)])]
    for name, columns, table in tables:
        try:
            write_atomic(out / name, csv_text(columns, table))
        except OSError as exc:
            raise CrappifyError(f"cannot write {out / name}: {exc.strerror or exc}; free space or fix "
                                "permissions, then run the same command again to finish") from None


def _read_config(path: Path) -> dict[str, Any] | None:
    """A dataset's config.yaml as a mapping; None when it cannot be read as one (any file named so)."""
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _manifest_header_ok(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), None) == MANIFEST_COLUMNS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def _is_dataset(out: Path, config: dict[str, Any] | None) -> bool:
    """Whether OUT is a folder this tool built, so that --overwrite may clear it: it holds the marker.

    Datasets built before the marker existed hold none; one of those is recognised by a config.yaml mapping
    that names crappify's version and a manifest.csv with exactly our header (or the journal of a build
    killed before its manifest was written). A foreign folder that merely holds a config.yaml is not."""
    if (out / MARKER).is_file():
        return True
    if config is None or not isinstance(config.get("versions"), dict) or "crappify" not in config["versions"]:
        return False
    return _manifest_header_ok(out / "manifest.csv") or (out / JOURNAL).is_file()


def _changed_keys(previous: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The keys of `identity` whose value differs in an earlier config.yaml (keys added since default), and
    the optional keys (`shard`, `square`) that only the earlier one has."""
    keys = [*identity, *(k for k in OPTIONAL_KEYS if k in previous and k not in identity)]
    return [k for k in keys if previous.get(k, LATER_KEYS.get(k)) != identity.get(k)]


def _clear(out: Path) -> None:
    """Remove what a build writes (the marker stays: the folder is still ours if this is interrupted)."""
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)


def _prepare_out(out: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """Create or check OUT; returns True when resuming an existing build of the same config."""
    cfg_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise CrappifyError(f"output path exists and is not a folder: {out}")
    if not out.is_dir() or not any(p.name not in IGNORED_NAMES for p in out.iterdir()):
        return False
    ours = (out / MARKER).is_file()
    if not cfg_path.is_file():
        if ours:  # killed between writing the marker and config.yaml, or while clearing: nothing to reuse
            _clear(out)
            return False
        raise CrappifyError(f"output folder {out} is not empty and is not a crappify dataset; "
                            "choose a new or empty folder")
    previous = _read_config(cfg_path)
    ours = _is_dataset(out, previous)
    if previous is None and not (ours and overwrite):
        hint = "use --overwrite to rebuild it" if ours else "choose a new or empty folder"
        raise CrappifyError(f"{cfg_path} is not a crappify dataset config (not a YAML mapping); {hint}")
    changed = _changed_keys(previous, identity) if previous is not None else ["config.yaml"]
    if not changed and not overwrite:
        return True
    if not ours:
        raise CrappifyError(f"output folder {out} is not a crappify dataset (it holds a config.yaml, but no "
                            f"{MARKER} file or dataset manifest.csv), so it is never cleared, not even with "
                            "--overwrite; choose a new or empty folder")
    if not overwrite:
        raise CrappifyError(f"{out} was built with a different config (differs in: {', '.join(changed)}); "
                            "use --overwrite to rebuild it or choose another folder")
    _clear(out)
    return False


def _load_done(out: Path, items: list[Item]) -> dict[str, dict[str, Any]]:
    """Results already on disk: the last manifest/skipped files, then the journal of a killed run.

    A pair is reused only if both its files still look whole (`_pair_intact`): files are not fsynced, so
    after a power loss the journal can list a file that is empty or ends in zeros; such pairs are rebuilt.
    Skips whose reason was not the file's fault (`RETRIED_REASONS`) are tried again."""
    done: dict[str, dict[str, Any]] = {}
    if (out / "manifest.csv").is_file():
        with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                done[row["id"]] = row
    if (out / "skipped.csv").is_file():
        with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
            reasons = {row["source"]: row["reason"] for row in csv.DictReader(fh)}
        done.update({it.id: {"id": it.id, "skip": reasons[it.source]} for it in items if it.source in reasons})
    if (out / JOURNAL).is_file():
        with open(out / JOURNAL, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(rec, dict) and "id" in rec:
                    done[rec["id"]] = rec
    return {k: v for k, v in done.items()
            if (not str(v["skip"]).startswith(RETRIED_REASONS) if "skip" in v else _pair_intact(out, v))}


def _pair_intact(out: Path, row: dict[str, Any]) -> bool:
    """Whether a finished pair's HR and LR files are still whole, with the sizes its row records."""
    try:
        hr_size = (int(row["hr_width"]), int(row["hr_height"]))
        lr_size = (int(row["lr_width"]), int(row["lr_height"]))
        hr, lr = out / row["hr"], out / row["lr"]
    except (KeyError, TypeError, ValueError):
        return False
    try:  # a regular file in OUT (not a symlink, as older builds linked for a symlinked photo)
        if not all(stat.S_ISREG(os.lstat(p).st_mode) for p in (hr, lr)):
            return False
    except OSError:
        return False
    # The LR's bytes are always ours (OpenCV's encoders: a JPEG ends with EOI); an HR may be the source's own
    # bytes, which may carry data after the end marker.
    return file_intact(lr, lr_size, strict_end=True) and file_intact(hr, hr_size)


def _open_journal(path: Path) -> TextIO:
    """The journal of finished items, opened for appending on a fresh line."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    journal = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the caller's ExitStack)
    if torn:  # a kill cut the last line short
        journal.write("\n")
    return journal


def _progress(total: int, initial: int, show: bool) -> Any:
    """A tqdm bar on stderr, or None (tqdm is imported only when a bar is shown: 30 ms of start-up)."""
    if not show:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="build-dataset", file=sys.stderr, smoothing=0.1)


def build_dataset(cfg: BuildConfig, overwrite: bool = False, progress: bool = True) -> BuildResult:
    """Build (or resume) the dataset described by `cfg`; see the module docstring for the layout. OUT is locked
    for the whole build: a second build into it fails at once with one line naming this one's pid."""
    try:
        with folder_lock(cfg.out, "build-dataset run"):
            return _build_dataset(cfg, overwrite, progress)
    except OSError as exc:  # the machine's, not a photo's: a full disk, a read-only or vanished OUT
        if isinstance(exc, BrokenPipeError):  # stderr closed: nobody to tell
            raise
        where = exc.filename if exc.filename is not None else f"writing to {cfg.out}"
        raise CrappifyError(f"{where}: {exc.strerror or exc}; fix that (free space, permissions), then run the "
                            "same command again to resume") from None


def _build_dataset(cfg: BuildConfig, overwrite: bool, progress: bool) -> BuildResult:
    start = time.perf_counter()
    _MADE_DIRS.clear()  # folders may have been removed since an earlier build in this process
    chain = load_preset(cfg.preset)
    scale = effective_scale(chain, cfg.scale)
    layout, listing = list_source(Path(cfg.src), cfg.source, cfg.seed, cfg.split, cfg.limit, exclude=[cfg.out])
    if listing.excluded:  # OUT inside SRC, or other datasets there: their files are outputs, never photos
        shown = ", ".join(listing.excluded[:3]) + (f" and {len(listing.excluded) - 3} more"
                                                   if len(listing.excluded) > 3 else "")
        print(f"crappify: note: {shown} (in {cfg.src}) not read as source: the output folder, or a dataset "
              f"(it holds {MARKER})", file=sys.stderr, flush=True)
    out = Path(cfg.out)
    identity = resolved_config(cfg, layout, chain, scale)
    if cfg.shard is not None:  # only this part's items from here on; ids, splits and seeds are the whole build's
        identity[PART_KEY], listing = shard_listing(listing, cfg.shard)
    resuming = _prepare_out(out, identity, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():  # before anything else is written (also added to older datasets)
        write_atomic(out / MARKER, MARKER_TEXT)
    if not resuming:
        write_atomic(out / "config.yaml", config_text({**identity, "versions": versions()}))
    else:
        clean_stale_temps(out, recursive=True, locked=True)  # a killed build's: the lock says none is writing here
    done = _load_done(out, listing.items) if resuming else {}
    todo = [it for it in listing.items if it.id not in done]
    job = Job(out, chain, cfg.size, scale, cfg.seed, cfg.max_pixels, cfg.hr_format, cfg.link_hr, cfg.max_bytes,
              cfg.square)

    results = dict(done)
    workers = min(cfg.workers, max(1, len(todo)))
    old_threads = cv2.getNumThreads()
    with contextlib.ExitStack() as stack:
        # One core per process, no OpenCV threads. In the parent this also stops OpenCV's thread pool
        # before forking: a child forked while that pool exists deadlocks in its first parallel op.
        cv2.setNumThreads(1)
        stack.callback(cv2.setNumThreads, old_threads)
        # Children are forked here, before any helper thread (the progress bar's) exists.
        finished = parallel_map(functools.partial(process_item, job=job), todo, workers, init=_init_worker)
        # An error that stops the run (a file that could not be read) stops the workers too, at once, rather
        # than whenever the traceback that holds this generator is freed.
        if hasattr(finished, "close"):
            stack.callback(finished.close)
        journal = stack.enter_context(_open_journal(out / JOURNAL))
        bar = stack.enter_context(_progress(len(listing.items), len(listing.items) - len(todo),
                                            progress and bool(todo)))
        flushed = time.monotonic()
        for res in finished:
            results[res["id"]] = res
            journal.write(json.dumps(res, separators=(",", ":")) + "\n")
            if time.monotonic() - flushed > JOURNAL_FLUSH_S:
                # A kill loses the lines of the last fraction of a second; those items are simply built
                # again on resume (same bytes, written by atomic rename), so nothing is ever wrong.
                journal.flush()
                flushed = time.monotonic()
            if bar is not None:
                bar.update(1)

    rows = [results[it.id] for it in listing.items if "skip" not in results[it.id]]
    skipped = listing.skipped + [(it.source, results[it.id]["skip"]) for it in listing.items
                                 if "skip" in results[it.id]]
    write_tables(out, rows, skipped)
    (out / JOURNAL).unlink(missing_ok=True)
    per_split = {s: sum(1 for r in rows if r["split"] == s) for s in SPLITS}
    return BuildResult(out, len(rows), len(skipped), len(listing.items) - len(todo),
                       time.perf_counter() - start, per_split)
