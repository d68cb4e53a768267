"""Run a trained generator over a built dataset's LR images (`RUN/preds/<split>/<id>.png`).

Critic pretraining needs the generator's outputs for the whole dataset; they are written once, at full
image size, and a re-run skips images already written. Images go through `srgan.inference`'s tiled
inference (padded to a multiple of 32 for U-Nets and cropped back; an image smaller than a tile is one
piece), so large photos need no more memory than small ones. A pair whose files cannot be read is skipped
with one line naming the file and its manifest row (the critic skips it too).

`RUN/preds/.crappify-preds` records which generator file (by content) the predictions are of: when the run's
generator changes, the next `save_preds` removes the old predictions (only `<split>/<id>.png` files, the ones
it writes) and writes new ones. A `preds/` folder without that record is someone else's: refused, never
cleared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from crappify.errors import CrappifyError
from crappify.imageio import ImageError, Photo, save_image_atomic, write_atomic
from crappify.runlock import clean_stale_temps
from srgan.checkpoint import file_digest, load_generator
from srgan.data import describe, read_dataset, read_image, warn
from srgan.generators import model_input
from srgan.inference import TiledInference
from srgan.normalize import Normalizer


def predict(model: nn.Module, lr: np.ndarray, hr_size: tuple[int, int] | None = None,
            normalizer: Normalizer | None = None, *, tile: int | None = None) -> np.ndarray:
    """One LR image (HWC uint8) → the generator's output (HWC uint8), in fp32 on the model's device.

    U-Nets take the LR resized (bicubic) to `hr_size` (width, height), as in training; SR models take the
    LR as it is (`srgan.generators.model_input`). `tile` as in `TiledInference` (None: 512 output px; 0: the whole
    image in one piece).
    The model's train/eval mode is restored afterwards.
    """
    lr = model_input(lr, hr_size, model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        engine = TiledInference(model, device=device, precision="fp32", tile=tile,
                                normalizer=normalizer or Normalizer())
        return engine(np.ascontiguousarray(lr))
    finally:
        model.train(was_training)


def save_preds(run: str | Path, data: str | Path, device: str | torch.device = "cpu",
               splits: tuple[str, ...] = ("train", "valid", "test")) -> int:
    """Write `RUN/preds/<split>/<id>.png` for every readable pair of DATA; returns how many were written now.

    Paths come from `read_dataset`, which refuses ids that would lead outside RUN/preds/<split>/."""
    run = Path(run)
    model = load_generator(run / "generator.safetensors", device)
    pairs_by_split, _ = read_dataset(data)
    claim_preds(run, file_digest(run / "generator.safetensors"))
    normalizer = Normalizer()
    engine = TiledInference(model, device=device, precision="fp32", normalizer=normalizer)
    written = 0
    for split in splits:
        for pair in pairs_by_split.get(split, []):
            dst = run / "preds" / split / f"{pair.id}.png"
            if dst.is_file():
                continue
            try:
                lr = read_image(pair.lr, describe(pair))
                hr_w, hr_h = _image_size(pair.hr, describe(pair))
            except ImageError as exc:
                warn(f"save-preds: {exc}: skipped")
                continue
            out = engine(np.ascontiguousarray(model_input(lr, (hr_w, hr_h), model)))
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_image_atomic(dst, out)
            written += 1
    return written


def _image_size(path: Path, where: str = "") -> tuple[int, int]:
    """(width, height) of an image as `decode` gives it (upright), from its header; `ImageError` naming the file."""
    try:
        with Photo(path) as photo:
            return photo.size
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}" + (f" ({where})" if where else "")) from None


PREDS_MARKER = ".crappify-preds"
SPLITS = ("train", "valid", "test")


def preds_generator(run: str | Path) -> str | None:
    """The content hash of the generator RUN/preds/ was written with, or None when it has no record of ours."""
    marker = Path(run) / "preds" / PREDS_MARKER
    try:
        text = marker.read_text(encoding="utf-8")[:200] if marker.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def claim_preds(run: str | Path, generator: str) -> None:
    """Make RUN/preds/ hold predictions of the generator with content hash `generator` (and say so in its
    record): predictions of another generator (our record says which) are removed first; a folder there
    without our record, holding anything, is refused in one line (a user's, never cleared)."""
    preds = Path(run) / "preds"
    recorded = preds_generator(run)
    if recorded is None and preds.is_dir() and any(preds.iterdir()):
        raise CrappifyError(f"{preds} holds files crappify did not write (it has no {PREDS_MARKER}); move them "
                            "away, or write the run to another folder")
    if recorded == generator:
        return
    if recorded is not None:  # another generator's: remove the files save_preds writes, nothing else
        for split in SPLITS:
            folder = preds / split
            if not folder.is_dir():
                continue
            clean_stale_temps(folder)
            for path in folder.iterdir():
                if path.suffix == ".png" and path.is_file() and not path.is_symlink():
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    preds.mkdir(parents=True, exist_ok=True)
    write_atomic(preds / PREDS_MARKER, generator + "\n")
