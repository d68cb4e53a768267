"""Training data from a `build-dataset` folder: paired LR/HR crops through fastai DataLoaders.

Reads `manifest.csv` and its splits. Each item gives uint8 CHW tensors; normalisation happens on the
device for the whole batch (one shared `Normalizer`, so inputs, targets and outputs can never disagree
about it — the colour-shift bug users of other tools report). Crops are aligned between LR and HR:
for U-Net generators the LR is first resized to the HR size (`srgan.upsample.resize_image`, the evaluation's
bicubic), as in the fastai course; for super-resolution generators it stays small and its crop is the HR
crop divided by the dataset's scale. Augmentation draws from a generator seeded by (seed, epoch, index):
the same run sees the same crops.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from crappify.errors import CrappifyError
from crappify.imageio import decode
from srgan.checkpoint import IMAGENET_STATS
from srgan.upsample import resize_image


@dataclass(frozen=True)
class Pair:
    id: str
    lr: Path
    hr: Path


class Normalizer:
    """ImageNet normalisation of uint8 batches and its exact inverse; the one pair every stage uses."""

    def __init__(self, stats: tuple[list[float], list[float]] = IMAGENET_STATS) -> None:
        self.mean = torch.tensor(stats[0]).view(1, 3, 1, 1)
        self.std = torch.tensor(stats[1]).view(1, 3, 1, 1)

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(x.device), self.std.to(x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) in 0..255 → float32, ImageNet-normalised."""
        mean, std = self._on(x)
        return (x.float() / 255.0 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float → float32 in [0, 1] (clamped)."""
        mean, std = self._on(x)
        return (x.float() * std + mean).clamp_(0.0, 1.0)

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float → uint8 0..255 (rounded)."""
        return (self.denormalize(x) * 255.0).round_().to(torch.uint8)


def read_dataset(root: str | Path) -> tuple[dict[str, list[Pair]], dict]:
    """Pairs per split from `root/manifest.csv`, and the dataset's `config.yaml`."""
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise CrappifyError(f"{root} is not a built dataset (no manifest.csv); make one with `crappify build-dataset`")
    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    splits: dict[str, list[Pair]] = {}
    with open(manifest, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            splits.setdefault(row["split"], []).append(Pair(row["id"], root / row["lr"], root / row["hr"]))
    return splits, config


def _crop_box(h: int, w: int, size: int, rng: np.random.Generator | None, step: int) -> tuple[int, int]:
    """Top-left of a size×size HR crop, on a grid of `step` px so the LR crop is aligned; centre if no rng."""
    ys, xs = (h - size) // step, (w - size) // step
    if rng is None:
        return ys // 2 * step, xs // 2 * step
    return int(rng.integers(0, ys + 1)) * step, int(rng.integers(0, xs + 1)) * step


class PairDataset(torch.utils.data.Dataset):
    """Aligned (LR, HR) uint8 CHW crops; random crops and flips when `train`, centre crops otherwise."""

    def __init__(self, pairs: list[Pair], size: int, scale: int = 1, resize_lr: bool = True, train: bool = True,
                 seed: int = 0) -> None:
        if resize_lr:
            scale = 1
        if size % scale:
            raise CrappifyError(f"crop size {size} must be a multiple of the scale {scale}")
        self.pairs, self.size, self.scale, self.resize_lr = pairs, size, scale, resize_lr
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """New random crops each epoch, the same ones for the same (seed, epoch)."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[i]
        hr, lr = decode(pair.hr), decode(pair.lr)
        h, w = hr.shape[:2]
        if self.resize_lr and lr.shape[:2] != (h, w):
            lr = resize_image(lr, (w, h))
        elif not self.resize_lr and lr.shape[:2] != (h // self.scale, w // self.scale):
            raise CrappifyError(f"{pair.id}: LR {lr.shape[1]}x{lr.shape[0]} is not HR {w}x{h} / {self.scale}")
        size, s = self.size, self.scale
        if min(h, w) < size:  # crops larger than the image: reflect-pad both to the crop size
            ph, pw = max(0, size - h), max(0, size - w)
            hr = cv2.copyMakeBorder(hr, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
            lr = cv2.copyMakeBorder(lr, 0, -(-ph // s), 0, -(-pw // s), cv2.BORDER_REFLECT_101)
            h, w = hr.shape[:2]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        y, x = _crop_box(h, w, size, rng, s)
        hr = hr[y:y + size, x:x + size]
        lr = lr[y // s:(y + size) // s, x // s:(x + size) // s]
        if rng is not None and rng.random() < 0.5:
            hr, lr = hr[:, ::-1], lr[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1))


class NormalizeBatch:
    """fastai `after_batch` step: uint8 → normalised float on the device, optionally channels-last."""

    def __init__(self, normalizer: Normalizer, channels_last: bool = False) -> None:
        self.normalizer, self.channels_last = normalizer, channels_last

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return tuple(self.normalizer.normalize(t).contiguous(memory_format=fmt) for t in batch)


def default_workers(device: torch.device | str, num_workers: int | None = None) -> int:
    """Data-loading processes: as asked, else up to 8 on CUDA (0 starves an H100: 39 vs 118 img/s in
    benchmarks/bench_train.py) and 0 on the CPU, where workers would take cores from the model."""
    if num_workers is not None:
        return num_workers
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def make_dataloaders(root: str | Path, size: int, bs: int, *, resize_lr: bool, scale: int = 1,
                     device: torch.device | str = "cpu", num_workers: int | None = None, seed: int = 0,
                     channels_last: bool = False, normalizer: Normalizer | None = None):
    """fastai DataLoaders (train shuffled, valid in order) over a built dataset's train/valid splits."""
    from fastai.data.core import DataLoaders

    from srgan.loader import SeededDataLoader

    splits, _ = read_dataset(root)
    train = splits.get("train", [])
    valid = splits.get("valid") or splits.get("test") or []
    if not train or not valid:
        raise CrappifyError(f"{root} needs both a train and a valid (or test) split; has {sorted(splits)}")
    norm = NormalizeBatch(normalizer or Normalizer(), channels_last)
    common = {"num_workers": default_workers(device, num_workers), "after_batch": norm, "device": torch.device(device)}
    train_dl = SeededDataLoader(PairDataset(train, size, scale, resize_lr, True, seed), bs=bs, shuffle=True,
                                drop_last=len(train) >= bs, order_seed=seed, **common)
    valid_dl = SeededDataLoader(PairDataset(valid, size, scale, resize_lr, False, seed), bs=bs, shuffle=False,
                                **common)
    return DataLoaders(train_dl, valid_dl, device=torch.device(device))
