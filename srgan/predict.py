"""Run a trained generator over a built dataset's LR images (`RUN/preds/<split>/<id>.png`).

Critic pretraining needs the generator's outputs for the whole dataset; they are written once, at full
image size, and a re-run skips images already written. Whole images go through the model in one piece
(padded to a multiple of 32 for U-Nets and cropped back); tiled inference for large photos belongs to
`enhance`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crappify.imageio import decode, save_image_atomic
from srgan.checkpoint import load_generator
from srgan.data import Normalizer, read_dataset
from srgan.models import is_unet


@torch.no_grad()
def predict(model: nn.Module, lr: np.ndarray, hr_size: tuple[int, int] | None = None,
            normalizer: Normalizer | None = None) -> np.ndarray:
    """One LR image (HWC uint8) → the generator's output (HWC uint8).

    U-Nets take the LR resized (bicubic) to `hr_size` (width, height), as in training, padded by
    reflection to a multiple of 32 and cropped back; SR models take the LR as it is.
    """
    normalizer = normalizer or Normalizer()
    device = next(model.parameters()).device
    if is_unet(model) and hr_size is not None and (lr.shape[1], lr.shape[0]) != hr_size:
        lr = cv2.resize(lr, hr_size, interpolation=cv2.INTER_CUBIC)
    x = normalizer.normalize(torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].to(device))
    h, w = x.shape[-2:]
    if is_unet(model):
        ph, pw = -h % 32, -w % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    out = model(x)
    scale = out.shape[-1] // x.shape[-1]
    out = out[..., : h * scale, : w * scale]
    return normalizer.to_uint8(out.float())[0].permute(1, 2, 0).cpu().numpy()


def save_preds(run: str | Path, data: str | Path, device: str | torch.device = "cpu",
               splits: tuple[str, ...] = ("train", "valid", "test")) -> int:
    """Write `RUN/preds/<split>/<id>.png` for every pair of DATA; returns how many were written now."""
    run = Path(run)
    model = load_generator(run / "generator.safetensors", device)
    pairs_by_split, _ = read_dataset(data)
    normalizer = Normalizer()
    written = 0
    for split in splits:
        for pair in pairs_by_split.get(split, []):
            dst = run / "preds" / split / f"{pair.id}.png"
            if dst.is_file():
                continue
            lr = decode(pair.lr)
            hr_w, hr_h = _image_size(pair.hr)
            out = predict(model, lr, (hr_w, hr_h), normalizer)
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(dst, out)
            written += 1
    return written


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size
