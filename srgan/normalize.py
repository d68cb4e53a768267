"""ImageNet normalisation: the statistics every model file records, the `Normalizer` every stage uses, and the
fastai `after_batch` step that applies it to a batch on the device.

One shared `Normalizer` for inputs, targets and outputs, so they can never disagree about it (the colour-shift
bug users of other tools report). Bottom layer: torch only.
"""

from __future__ import annotations

import torch

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


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


class NormalizeBatch:
    """fastai `after_batch` step: uint8 images → normalised float on the device, optionally channels-last.

    `labels`: the batch is (images, labels) — the labels become float and are not normalised (the critic's
    real/fake data); otherwise every tensor of the batch is an image (LR and HR)."""

    def __init__(self, normalizer: Normalizer, channels_last: bool = False, labels: bool = False) -> None:
        self.normalizer, self.channels_last, self.labels = normalizer, channels_last, labels

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.labels:
            x, y = batch
            return self.normalizer.normalize(x).contiguous(memory_format=fmt), y.float()
        return tuple(self.normalizer.normalize(t).contiguous(memory_format=fmt) for t in batch)
