"""Training data from a `build-dataset` folder: paired LR/HR crops through fastai DataLoaders.

Reads `manifest.csv` and its splits. Each item gives uint8 CHW tensors; normalisation happens on the
device for the whole batch (one shared `Normalizer`, so inputs, targets and outputs can never disagree
about it — the colour-shift bug users of other tools report). Crops are aligned between LR and HR:
for U-Net generators the LR is first resized to the HR size (`srgan.upsample.resize_image`, the evaluation's
bicubic), as in the fastai course; for super-resolution generators it stays small and its crop is the HR
crop divided by the dataset's scale. Augmentation draws from a generator seeded by (seed, epoch, index):
the same run sees the same crops.

`degrade="online"` (Real-ESRGAN's way) reads only the HR of each training pair and degrades its crop in the
loader with a degradation chain (the dataset's own preset, or `degrade_preset`), from a generator seeded by
(seed, epoch, index, DEGRADE_TAG): every epoch sees fresh degradations, the same ones for the same run, with
any number of loader workers, and a run resumed at epoch E sees what the uninterrupted run saw. Validation
always reads the offline LR files. `sharpen_gt` trains towards USM-sharpened HR crops, as Real-ESRGAN does;
online, the LR is degraded from that sharpened crop too (Real-ESRGAN blurs and degrades its sharpened GT,
`RealESRGANModel.feed_data`), while offline the LR files stay what the dataset made from the plain HR.
Validation always scores against the plain HR.
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import cv2
import numpy as np
import torch

from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import ImageError, ReadError, decode
from crappify.sources import id_problem
from crappify.yamlfile import safe_load
from srgan.generators import model_input
from srgan.normalize import NormalizeBatch, Normalizer

if TYPE_CHECKING:
    from crappify.chain import Chain

T = TypeVar("T")
# A training stage goes on past unreadable items (each replaced by another) until more than this many, and more
# than this share of its items, have failed: a few bad files in a big dataset cost nothing, a broken one stops.
MAX_UNREADABLE = 10
MAX_UNREADABLE_SHARE = 0.01
# Mixed into the seed of an item's online degradation, so it is drawn independently of its crop ([seed, epoch, i])
# and of its substitute ([seed, epoch, i, 7]).
DEGRADE_TAG = 0x64656772  # "degr"
DEGRADE_MODES = ("offline", "online")
# Decoded pixels a dataset keeps per process (`DecodeCache`): the demo's 1280 pairs take 71 MB; a dataset larger
# than this is cached up to it, the rest decoded every epoch as before.
DECODE_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Pair:
    id: str
    lr: Path
    hr: Path
    row: str = ""  # where the manifest lists it ("DATA/manifest.csv line N"), for messages


def data_scale(config: dict) -> int:
    """The HR/LR ratio a dataset's `config.yaml` records: what every generator file trained on it stores as
    `data_scale` (1 where the preset resizes to a fixed LR size instead of a ratio)."""
    return int(config.get("scale") or 1)


def read_dataset(root: str | Path) -> tuple[dict[str, list[Pair]], dict]:
    """Pairs per split from `root/manifest.csv`, and the dataset's `config.yaml`.

    Every row is checked here, so no consumer can be led outside its folders by a hostile manifest: `hr`
    and `lr` must stay inside `root` once symlinks are resolved, and `id` and `split` must be safe relative
    names (they name files under RUN/preds/). A bad row stops with one line naming the file and line.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise CrappifyError(f"{root} is not a built dataset (no manifest.csv); make one with `crappify build-dataset`")
    config = safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    splits: dict[str, list[Pair]] = {}
    checker = _PathChecker(root)
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            _ = reader.fieldnames  # reads the header: line numbers below are where each record starts
            line = reader.line_num + 1
            for row in reader:
                where = f"{manifest} line {line}"
                line = reader.line_num + 1
                values = {k: row.get(k) for k in ("id", "split", "hr", "lr")}
                missing = [k for k, v in values.items() if not v]
                if missing:
                    raise CrappifyError(f"{where}: no {', '.join(missing)} (is it a manifest.csv of build-dataset?)")
                problem = id_problem(values["id"])  # the rule build-dataset applies: accepted there, accepted here
                if problem is not None:
                    raise CrappifyError(f"{where}: id {values['id']!r} is not a safe file name: it {problem}")
                _check_name(values["split"], "split", where, nested=False)
                hr, lr = checker(values["hr"], "hr", where), checker(values["lr"], "lr", where)
                splits.setdefault(values["split"], []).append(Pair(values["id"], lr, hr, where))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CrappifyError(f"{manifest}: not a readable CSV file ({exc})") from None
    return splits, config


def _check_name(value: str, column: str, where: str, nested: bool = True) -> None:
    """`value` must be a relative name: '/'-separated parts (only when `nested`) that are none of '', '.', '..',
    without backslashes or NUL characters. Ids are checked by `crappify.sources.id_problem` instead."""
    parts = value.split("/") if nested else [value]
    if "\0" in value or "\\" in value or any(p in ("", ".", "..") for p in parts) or (not nested and "/" in value):
        raise CrappifyError(f"{where}: {column} {value!r} is not a safe file name (no '..', absolute path, "
                            "backslash or NUL allowed)")


class _PathChecker:
    """Resolves a manifest's relative paths under `root` and refuses any that lead outside it (through '..',
    an absolute path or a symlink). Real paths of parent folders are cached: a manifest lists thousands of
    files in a few folders, and resolving every path from scratch cost ~18 µs."""

    def __init__(self, root: Path) -> None:
        self.root, self.real = root, os.path.realpath(root)
        self.parents: dict[str, str] = {}

    def __call__(self, value: str, column: str, where: str) -> Path:
        if "\0" in value:
            raise CrappifyError(f"{where}: {column} path {value!r} holds a NUL character")
        if os.path.isabs(value):
            raise CrappifyError(f"{where}: {column} path {value!r} is absolute; a manifest lists paths relative to "
                                f"{self.root}")
        path = os.path.join(self.root, value)
        head, name = os.path.split(path)
        if name in ("", ".", ".."):
            real = os.path.realpath(path)
        else:
            parent = self.parents.get(head)
            if parent is None:
                parent = self.parents[head] = os.path.realpath(head)
            real = os.path.join(parent, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        if os.path.commonpath([self.real, real]) != self.real:
            raise CrappifyError(f"{where}: {column} path {value!r} leads outside the dataset folder {self.root} "
                                f"(to {real})")
        return self.root / value


def _crop_box(h: int, w: int, size: int, rng: np.random.Generator | None, step: int) -> tuple[int, int]:
    """Top-left of a size×size HR crop, on a grid of `step` px so the LR crop is aligned; centre if no rng."""
    ys, xs = (h - size) // step, (w - size) // step
    if rng is None:
        return ys // 2 * step, xs // 2 * step
    return int(rng.integers(0, ys + 1)) * step, int(rng.integers(0, xs + 1)) * step


def warn(message: str) -> None:
    """One `crappify: warning: ...` line on stderr (from DataLoader workers too)."""
    print(f"crappify: warning: {message}", file=sys.stderr, flush=True)


def describe(pair: Pair) -> str:
    """How messages name a pair: its id and manifest row."""
    return f"pair {pair.id!r}, {pair.row}" if pair.row else f"pair {pair.id!r}"


def read_image(path: str | Path, where: str = "") -> np.ndarray:
    """`decode(path)`; an unreadable file raises `ImageError` whose one-line message names the file and `where`
    (e.g. the manifest row that lists it)."""
    try:
        return decode(path)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}" + (f" ({where})" if where else "")) from None


def read_image_or_none(path: str | Path, where: str = "") -> np.ndarray | None:
    """`read_image`, or None after a one-line warning naming the file (for callers that skip what they cannot
    read and go on)."""
    try:
        return read_image(path, where)
    except ImageError as exc:
        warn(f"skipped: {exc}")
        return None


def too_many_unreadable(failed: int, total: int) -> bool:
    """Whether a stage must stop: more than MAX_UNREADABLE items, and more than MAX_UNREADABLE_SHARE of them."""
    return failed > max(MAX_UNREADABLE, total * MAX_UNREADABLE_SHARE)


class Unreadable:
    """The items of a Dataset that could not be read, one flag each in shared memory, so that the process that
    owns the Dataset and all its DataLoader workers (forked or spawned, every epoch anew) see the same record.

    Each item is reported once on stderr (twice at worst, when two workers fail on the same file at the same
    instant) and skipped at once afterwards; once `too_many_unreadable` holds, `add` raises a one-line
    `CrappifyError` (from a worker, `srgan.loader.SeededDataLoader` re-raises it as that one line in the main
    process).
    """

    def __init__(self, n: int, what: str = "pairs") -> None:
        self.n, self.what = n, what
        self.flags = torch.zeros(max(n, 1), dtype=torch.uint8).share_memory_()

    def __contains__(self, i: int) -> bool:
        return bool(self.flags[i])

    def count(self) -> int:
        return int(self.flags.sum())

    def add(self, i: int, message: str) -> None:
        """Record item i as unreadable (`message` names the file); stop when too many are."""
        if not self.flags[i]:
            self.flags[i] = 1
            warn(f"{message}: skipped, another of the {self.what} takes its place")
        failed = self.count()
        if too_many_unreadable(failed, self.n):
            raise CrappifyError(f"{failed} of {self.n} {self.what} could not be read: more than {MAX_UNREADABLE} and "
                                f"more than {MAX_UNREADABLE_SHARE:.0%} of them stops the stage; the last: {message}")

    def substitutes(self, i: int, seed: int, epoch: int) -> Iterator[int]:
        """Every other index once, from a start drawn from (seed, epoch, i): what takes item i's place."""
        n = self.n
        if n < 2:
            return
        start = i + 1 + int(np.random.default_rng([seed, epoch, i, 7]).integers(n - 1))
        yield from (j for j in ((start + k) % n for k in range(n)) if j != i)


class DecodeCache:
    """Item i's decoded pixels (with a U-Net's LR already resized), read once and kept for the next epochs, up to
    `budget` bytes per dataset, first come first kept: reading a pair took 1.3 ms of the 64 px demo's 10 ms per
    item (two PNG decodes and a bicubic resize), every epoch again. Only the process that owns the dataset keeps
    them (the CPU's default, no loader workers): a worker ends with its epoch and would keep them for nothing, and
    the dataset pickled into spawned workers leaves them behind. Kept arrays are read-only, so a crop of one
    cannot be written to by later code without an error."""

    def __init__(self, budget: int = DECODE_CACHE_BYTES) -> None:
        self.budget, self.used, self.items = budget, 0, {}

    def __getstate__(self) -> dict:
        return {"budget": self.budget, "used": 0, "items": {}}

    def get(self, i: int, read: Callable[[int], T]) -> T:
        """read(i), from the cache when it holds item i; kept when the budget allows."""
        if i in self.items:
            return self.items[i]
        value = read(i)
        if torch.utils.data.get_worker_info() is None:
            arrays = [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, np.ndarray)]
            size = sum(a.nbytes for a in arrays)
            if self.used + size <= self.budget:
                for a in arrays:
                    a.setflags(write=False)
                self.items[i], self.used = value, self.used + size
        return value


def read_or_substitute(i: int, read: Callable[[int], T], unreadable: Unreadable, seed: int = 0,
                       epoch: int = 0) -> tuple[int, T]:
    """(i, read(i)); when `read` raises `ImageError` (its message naming the file), (j, read(j)) for the first
    readable j of `unreadable.substitutes(i, seed, epoch)`. Unreadable items are recorded (and stop the stage
    when too many); the substitute depends only on the seed, the epoch and which files are bad, so a run with
    bad files trains the same weights every time, with any number of loader workers."""
    for j in itertools.chain((i,), unreadable.substitutes(i, seed, epoch)):
        if j in unreadable:
            continue
        try:
            return j, read(j)
        except ReadError:  # the machine's fault (EIO, EMFILE, permissions), not the photo's: stop, never skip
            raise
        except ImageError as exc:
            unreadable.add(j, str(exc))
    raise CrappifyError(f"none of the {unreadable.n} {unreadable.what} could be read")


class PairDataset(torch.utils.data.Dataset):
    """Aligned (LR, HR) uint8 CHW crops; random crops and flips when `train`, centre crops otherwise.

    A pair that cannot be read (or whose LR does not fit its HR) is reported once and replaced by another,
    chosen from the seed (`read_or_substitute`); too many such pairs stop with one line.
    """

    def __init__(self, pairs: list[Pair], size: int, scale: int = 1, resize_lr: bool = True, train: bool = True,
                 seed: int = 0, sharpen_gt: bool = False) -> None:
        if resize_lr:
            scale = 1
        if size % scale:
            raise CrappifyError(f"crop size {size} must be a multiple of the scale {scale}")
        self.pairs, self.size, self.scale, self.resize_lr = pairs, size, scale, resize_lr
        self.train, self.seed, self.epoch = train, seed, 0
        self.sharpen_gt = sharpen_gt and train  # validation scores against the plain HR
        self.unreadable = Unreadable(len(pairs), f"{'training' if train else 'validation'} pairs")
        self.cache = DecodeCache()

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """New random crops each epoch, the same ones for the same (seed, epoch)."""
        self.epoch = epoch

    def read_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair i's (LR, HR) pixels, the LR resized to the HR for U-Nets; `ImageError` naming the file and row."""
        pair = self.pairs[i]
        where = describe(pair)
        hr, lr = read_image(pair.hr, where), read_image(pair.lr, where)
        h, w = hr.shape[:2]
        if self.resize_lr:
            lr = model_input(lr, (w, h), True)
        elif lr.shape[:2] != (h // self.scale, w // self.scale):
            raise ImageError(f"{pair.lr}: LR {lr.shape[1]}x{lr.shape[0]} is not HR {w}x{h} / {self.scale} ({where})")
        return lr, hr

    def crop(self, i: int, hr: np.ndarray, lr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Item i's crop of `hr` (and of `lr`, at 1/scale): both reflect-padded to the crop size when smaller;
        in training a random crop and flip drawn from (seed, epoch, i), else the centre crop. The one rule for
        offline and online items, so both see the same crops under the same seed."""
        h, w = hr.shape[:2]
        size, s = self.size, self.scale
        if min(h, w) < size:  # crops larger than the image: reflect-pad to the crop size
            ph, pw = max(0, size - h), max(0, size - w)
            hr = cv2.copyMakeBorder(hr, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
            if lr is not None:
                lr = cv2.copyMakeBorder(lr, 0, -(-ph // s), 0, -(-pw // s), cv2.BORDER_REFLECT_101)
            h, w = hr.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        y, x = _crop_box(h, w, size, rng, s)
        hr = hr[y:y + size, x:x + size]
        if lr is not None:
            lr = lr[y // s:(y + size) // s, x // s:(x + size) // s]
        if rng is not None and rng.random() < 0.5:
            hr = hr[:, ::-1]
            lr = lr[:, ::-1] if lr is not None else None
        return hr, lr

    def read_cached(self, i: int):
        """`read_pair(i)`, decoded once per process (`DecodeCache`)."""
        return self.cache.get(i, self.read_pair)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, (lr, hr) = read_or_substitute(i, self.read_cached, self.unreadable, self.seed, self.epoch)
        hr, lr = self.crop(i, hr, lr)
        return chw_tensor(lr), chw_tensor(sharpen(hr) if self.sharpen_gt else hr)


def chw_tensor(img: np.ndarray) -> torch.Tensor:
    """A CHW tensor of its own (never a view of a cached, read-only array)."""
    return torch.from_numpy(np.array(img, order="C", copy=True)).permute(2, 0, 1)


def sharpen(img: np.ndarray) -> np.ndarray:
    """Real-ESRGAN's training target: the HR crop through unsharp masking (weight 0.5, radius 50, threshold 10)."""
    from crappify.functional import usm_sharpen

    return usm_sharpen(np.ascontiguousarray(img), weight=0.5, radius=50, threshold=10)


def degradation_chain(config: dict, preset: str | None = None, data_scale: int | None = None,
                      root: str | Path = "the dataset") -> Chain:
    """The chain that online degradation runs: `preset` (a built-in name or a YAML file) when given, else the
    preset the dataset was built with (`preset` in its config.yaml). One-line `ConfigError` when there is none,
    the name is unknown (listing the valid ones) or its fixed scale is not the dataset's (`data_scale`)."""
    from crappify.chain import Chain, load_preset

    if preset is not None:
        chain = load_preset(preset)
    else:
        recorded = config.get("preset")
        if not isinstance(recorded, dict):
            raise ConfigError(f"{root}/config.yaml records no preset to degrade with online; give degrade_preset "
                              "(a built-in preset name or a YAML file)")
        chain = Chain.from_dict(recorded)
    if chain.scale is not None and data_scale is not None and chain.scale != data_scale:
        raise ConfigError(f"preset {chain.name!r} fixes scale {chain.scale}, but {root} has scale {data_scale}; "
                          "degrade online with a preset of the dataset's scale (or scale: null)")
    return chain


def degrade_rng(seed: int, epoch: int, i: int) -> np.random.Generator:
    """The generator item i's online degradation draws from in `epoch`: from the run's seed, the epoch and the
    item only, so any number of loader workers or ranks, and a resumed run, draw the same."""
    return np.random.default_rng([seed, epoch, i, DEGRADE_TAG])


class OnlinePairDataset(PairDataset):
    """Training (LR, HR) uint8 CHW crops degraded on the fly: only the HR file of each pair is read; its random
    crop (and flip: the same ones `PairDataset` takes, with the same seed) goes through `chain` with a generator
    seeded by (seed, epoch, i, DEGRADE_TAG), whose last `resize size: lr` targets crop / `data_scale`. For U-Nets
    (`resize_lr`) the LR is then resized to the crop size (`srgan.upsample.resize_image`, as offline). The chain
    is built once per dataset and pickled into the workers. (OpenCV's thread count is left alone: changing it in a
    worker forked after the parent used OpenCV's thread pool deadlocks.)"""

    def __init__(self, pairs: list[Pair], size: int, chain: Chain, data_scale: int | None, resize_lr: bool = True,
                 seed: int = 0, sharpen_gt: bool = False) -> None:
        super().__init__(pairs, size, data_scale or 1, resize_lr, True, seed, sharpen_gt)
        self.chain = chain
        s = data_scale or chain.scale
        if not resize_lr and not chain.uses_lr_size:
            raise ConfigError(f"preset {chain.name!r} has no `resize size: lr` step, so its LR cannot be the crop "
                              f"/ {self.scale} a super-resolution generator needs; degrade online with another")
        if chain.uses_lr_size and not s:
            raise ConfigError(f"preset {chain.name!r} resizes to the LR size, but the dataset has no scale (it was "
                              "built with a fixed-size preset); degrade online with a preset that fixes its scale")
        self.lr_size = (max(1, size // s), max(1, size // s)) if s else None
        self.degrade(np.zeros((size, size, 3), np.uint8), np.random.default_rng(0), "a test crop")  # fail here

    def read_pair(self, i: int) -> np.ndarray:
        """Pair i's HR pixels (the LR file is never read); `ImageError` naming the file and row."""
        pair = self.pairs[i]
        return read_image(pair.hr, describe(pair))

    def degrade(self, hr: np.ndarray, rng: np.random.Generator, what: str) -> np.ndarray:
        """The LR of an HR crop: the chain's output, at crop / scale (resized to the crop for U-Nets)."""
        try:
            lr = self.chain.run(hr, rng, lr_size=self.lr_size).image
        except CrappifyError as exc:
            kind = ConfigError if isinstance(exc, ConfigError) else CrappifyError
            raise kind(f"online degradation with preset {self.chain.name!r} failed on {what}: {exc}") from None
        size = self.size
        if self.resize_lr:
            return model_input(lr, (size, size), True)
        if self.lr_size is not None and (lr.shape[1], lr.shape[0]) != self.lr_size:
            raise ConfigError(f"preset {self.chain.name!r} gave a {lr.shape[1]}x{lr.shape[0]} LR for {what}, not "
                              f"{self.lr_size[0]}x{self.lr_size[1]} (crop {size} / scale {self.scale}); its last "
                              "resize must be `size: lr`")
        return lr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j, hr = read_or_substitute(i, self.read_cached, self.unreadable, self.seed, self.epoch)
        hr = np.array(self.crop(i, hr)[0], order="C", copy=True)
        if self.sharpen_gt:  # Real-ESRGAN degrades the sharpened crop too (RealESRGANModel.feed_data)
            hr = sharpen(hr)
        lr = self.degrade(hr, degrade_rng(self.seed, self.epoch, i), f"a crop of {describe(self.pairs[j])}")
        return chw_tensor(lr), chw_tensor(hr)


def default_workers(device: torch.device | str, num_workers: int | None = None) -> int:
    """Data-loading processes: as asked, else up to 8 on CUDA (0 starves an H100: 39 vs 118 img/s in
    benchmarks/bench_train.py) and 0 on the CPU, where workers would take cores from the model."""
    if num_workers is not None:
        return num_workers
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def make_dataloaders(root: str | Path, size: int, bs: int, *, resize_lr: bool, scale: int = 1,
                     device: torch.device | str = "cpu", num_workers: int | None = None, seed: int = 0,
                     channels_last: bool = False, normalizer: Normalizer | None = None, degrade: str = "offline",
                     degrade_preset: str | None = None, sharpen_gt: bool = False):
    """fastai DataLoaders (train shuffled, valid in order) over a built dataset's train/valid splits.

    `degrade="online"`: the training pairs' LR is made from each HR crop by a degradation chain (`degrade_preset`,
    a built-in name or a YAML file; default: the dataset's own preset), afresh every epoch (`OnlinePairDataset`);
    validation reads the LR files as always. `sharpen_gt`: training targets are USM-sharpened HR crops (online,
    degraded from the sharpened crop; offline, the LR files as built); validation targets stay plain."""
    from fastai.data.core import DataLoaders

    from srgan.loader import SeededDataLoader

    if degrade not in DEGRADE_MODES:
        raise ConfigError(f"degrade must be one of {', '.join(DEGRADE_MODES)}, got {degrade!r}")
    if degrade_preset is not None and degrade != "online":
        raise ConfigError("degrade_preset applies to degrade: online only (offline training reads the LR files)")
    splits, config = read_dataset(root)
    train = splits.get("train", [])
    valid = splits.get("valid") or splits.get("test") or []
    if not train or not valid:
        raise CrappifyError(f"{root} needs both a train and a valid (or test) split; has {sorted(splits)}")
    norm = NormalizeBatch(normalizer or Normalizer(), channels_last)
    # On CUDA the workers' batches go into pinned (page-locked) memory, which the copy to the GPU reads directly.
    # Not `persistent_workers`: fastai's loader hands its workers a copy of itself, made when they start, and draws
    # each pass's order and the dataset's epoch (the crops and online degradations) in the main process, so
    # workers kept from one pass to the next would still hold the first pass's.
    cuda = torch.device(device).type == "cuda"
    common = {"num_workers": default_workers(device, num_workers), "after_batch": norm, "device": torch.device(device),
              "pin_memory": cuda}
    if degrade == "online":
        data_scale = config.get("scale") or (None if resize_lr else scale)
        chain = degradation_chain(config, degrade_preset, data_scale, root)
        train_ds: PairDataset = OnlinePairDataset(train, size, chain, data_scale, resize_lr, seed, sharpen_gt)
    else:
        train_ds = PairDataset(train, size, scale, resize_lr, True, seed, sharpen_gt)
    train_dl = SeededDataLoader(train_ds, bs=bs, shuffle=True, drop_last=len(train) >= bs, order_seed=seed,
                                **common)
    valid_dl = SeededDataLoader(PairDataset(valid, size, scale, resize_lr, False, seed), bs=bs, shuffle=False,
                                **common)
    return DataLoaders(train_dl, valid_dl, device=torch.device(device))
