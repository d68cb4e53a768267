"""`train-critic`: pretrain a critic to tell real HR photos from the generator's outputs (fastai course, lesson 7).

Reads the dataset's HR images (label 1, real) and the run's saved generator outputs `RUN/preds/<split>/<id>.png`
(label 0, fake; written with `srgan.predict.save_preds` first when any is missing). Each item is a random
(train) or centre (valid) crop of `size` px, flipped at random in training. The critic is trained through a
fastai Learner with BCE-with-logits on its patch (or per-pixel) output, a one-cycle schedule and fastai's Adam
(`betas`, `eps`, `wd` from the config; by default fastai's, as train-gen's); accuracy is the share of output
cells on the right side of 0.5. Every epoch ends with a row in `RUN/critic-history.csv` and
a checkpoint `RUN/critic-checkpoints/last.pt` (model + optimiser + position); `checkpoint_every` N adds one every
N batches of an epoch, and SIGTERM writes one at the next batch boundary and stops. `resume` continues from the
checkpoint's position. The result is `RUN/critic.safetensors` (self-describing, like the generator file).
`grad_clip` and `grad_accum` add fastai's GradientClip and GradientAccumulation, as in train-gen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field

from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import write_atomic, write_csv_atomic
from srgan.checkpoint import (
    config_key,
    file_digest,
    load_optimizer_state,
    restore,
    resume_state,
    save_checkpoint,
    save_critic,
)
from srgan.data import (
    DecodeCache,
    Unreadable,
    chw_tensor,
    default_workers,
    describe,
    read_dataset,
    read_image,
    read_or_substitute,
)
from srgan.distributed import unwrap
from srgan.normalize import NormalizeBatch, Normalizer
from srgan.runtime import (
    MAX_BATCH,
    MAX_CROP,
    AdamOptions,
    RunOptions,
    StepOptions,
    StopRequest,
    compile_module,
    resolve_device,
    resolve_precision,
    sigterm_stops,
)

HISTORY_COLUMNS = ["epoch", "train_loss", "valid_loss", "accuracy", "seconds", "data_wait"]
RUN_KEYS = frozenset({"device", "precision", "channels_last", "num_workers", "epochs",  # see srgan.train_gen
                      "checkpoint_every", "compile", "log"})


class TrainCriticConfig(RunOptions, AdamOptions, StepOptions):
    """Options of `crappify train-critic` (also the keys of its `--config` YAML file)."""

    data: str
    out: str
    arch: str = "gan-critic"
    options: dict[str, Any] = Field(default_factory=dict, description="critic options (nf, n_blocks, ...)")
    size: int = Field(128, ge=8, le=MAX_CROP)
    bs: int = Field(8, ge=1, le=MAX_BATCH)
    epochs: int = Field(6, ge=1)
    lr: float = Field(1e-3, gt=0)
    pct_start: float = Field(0.3, gt=0, lt=1)
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N batches of an epoch")


# --------------------------------------------------------------------------------------------------------
# data


class RealFakeDataset(torch.utils.data.Dataset):
    """(uint8 CHW crop, label) for real HR images (1.0) and generator outputs (0.0).

    An image that cannot be read is reported once (naming the file and its manifest row) and replaced by
    another item chosen from the seed and epoch (`srgan.data.read_or_substitute`); too many stop the stage."""

    def __init__(self, items: list[tuple[Path, float, str]], size: int, train: bool = True, seed: int = 0) -> None:
        self.items, self.size, self.train, self.seed, self.epoch = items, size, train, seed, 0
        self.unreadable = Unreadable(len(items), f"{'training' if train else 'validation'} critic images")
        self.cache = DecodeCache()

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _read(self, j: int) -> tuple[np.ndarray, float]:
        path, label, where = self.items[j]
        return read_image(path, where), label

    def _read_cached(self, j: int) -> tuple[np.ndarray, float]:
        return self.cache.get(j, self._read)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, (img, label) = read_or_substitute(i, self._read_cached, self.unreadable, self.seed, self.epoch)
        h, w = img.shape[:2]
        size = self.size
        if min(h, w) < size:  # reflect-pad small images up to the crop size
            img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")
            h, w = img.shape[:2]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            flip = rng.random() < 0.5
        else:
            y, x, flip = (h - size) // 2, (w - size) // 2, False
        crop = img[y:y + size, x:x + size]
        if flip:
            crop = crop[:, ::-1]
        return chw_tensor(crop), torch.tensor(label)


def real_fake_items(data: str | Path, run: str | Path, split: str) -> list[tuple[Path, float, str]]:
    """(path, label, where) for every pair of `split`: its HR (real) and `RUN/preds/<split>/<id>.png` (fake);
    `where` names the pair and its manifest row for messages."""
    pairs = read_dataset(data)[0].get(split, [])
    preds = Path(run) / "preds" / split
    return [item for p in pairs for item in ((p.hr, 1.0, describe(p)), (preds / f"{p.id}.png", 0.0, describe(p)))]


def ensure_preds(data: str | Path, run: str | Path, device: torch.device, splits: tuple[str, ...]) -> int:
    """Write the generator's outputs for `splits` when any is missing, or when they are another generator's
    (needs RUN/generator.safetensors). Predictions put there by hand (no record of ours) are used as they are."""
    from srgan.predict import preds_generator

    missing = [p for s in splits for p, label, _ in real_fake_items(data, run, s) if not label and not p.is_file()]
    recorded = preds_generator(run)
    if not missing and (recorded is None or recorded == file_digest(Path(run) / "generator.safetensors")):
        return 0
    if not (Path(run) / "generator.safetensors").is_file():
        raise CrappifyError(f"{run} has no generator.safetensors and {len(missing)} prediction(s) are missing from "
                            f"{Path(run) / 'preds'}; run `crappify train-gen` first")
    from srgan.predict import save_preds

    return save_preds(run, data, device, splits=splits)


def make_critic_dataloaders(data: str | Path, run: str | Path, size: int, bs: int, *,
                            device: torch.device | str = "cpu", num_workers: int | None = None, seed: int = 0,
                            channels_last: bool = False, normalizer: Normalizer | None = None):
    """fastai DataLoaders of real/fake crops: train shuffled, valid (or test) in order."""
    from fastai.data.core import DataLoaders

    from srgan.loader import SeededDataLoader

    splits = read_dataset(data)[0]
    valid_split = "valid" if splits.get("valid") else "test"
    train, valid = real_fake_items(data, run, "train"), real_fake_items(data, run, valid_split)
    if not train or not valid:
        raise CrappifyError(f"{data} needs both a train and a valid (or test) split; has {sorted(splits)}")
    common = {"num_workers": default_workers(device, num_workers), "device": torch.device(device),
              "after_batch": NormalizeBatch(normalizer or Normalizer(), channels_last, labels=True)}
    train_dl = SeededDataLoader(RealFakeDataset(train, size, True, seed), bs=bs, shuffle=True,
                                drop_last=len(train) >= bs, order_seed=seed, **common)
    valid_dl = SeededDataLoader(RealFakeDataset(valid, size, False, seed), bs=bs, shuffle=False, **common)
    return DataLoaders(train_dl, valid_dl, device=torch.device(device))


# --------------------------------------------------------------------------------------------------------
# loss and metric on patch / per-pixel outputs


def _expand(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per-image labels (N,) broadcast to every output cell of `pred` (N, ...)."""
    return target.float().view(-1, *([1] * (pred.ndim - 1))).expand_as(pred)


def patch_bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of every output cell against its image's label (fastai's AdaptiveLoss, any output rank)."""
    pred = pred.float()
    return F.binary_cross_entropy_with_logits(pred, _expand(target, pred))


def patch_accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of output cells on the right side of 0.5 (fastai's accuracy_thresh_expand, any output rank)."""
    return ((pred.float() > 0) == (_expand(target, pred) > 0.5)).float().mean()


# --------------------------------------------------------------------------------------------------------
# training


def train_critic(cfg: TrainCriticConfig, resume: bool = False, progress: bool = True,
                 cbs: list | None = None) -> Path:
    """Pretrain a critic on RUN's saved generator outputs vs the real HR images; returns RUN/critic.safetensors.

    `resume` continues from RUN/critic-checkpoints/last.pt when it belongs to this config (and this generator,
    whose predictions it learned from); a checkpoint at the last epoch only writes the final file. SIGTERM: a
    checkpoint at the next batch boundary, then `Interrupted`. `cbs`: extra fastai callbacks (tests use them)."""
    from srgan.distributed import run_folder

    with run_folder(cfg.out, "train-critic run", ("", "critic-checkpoints")), sigterm_stops("train-critic") as stop:
        return _train_critic(cfg, resume, progress, stop, cbs)


def _train_critic(cfg: TrainCriticConfig, resume: bool, progress: bool, stop: StopRequest | None = None,
                  extra_cbs: list | None = None) -> Path:
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.learner import Learner
    from fastai.metrics import AvgMetric

    from srgan.callbacks import DeviceMixedPrecision, StopOnNonFinite, adam, gradient_callbacks, one_cycle_moms, quiet
    from srgan.critics import build_critic, min_input_size
    from srgan.distributed import barrier, distributed_callback, finish, is_distributed, is_main, local_device

    run = Path(cfg.out)
    device = local_device(resolve_device(cfg.device))
    # Under torchrun: DDP through fastai + Accelerate (made first: it joins the process group), rank 0 writes.
    ddp = distributed_callback(device) if is_distributed() else None
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # critic weight init
    model = build_critic(cfg.arch, **cfg.options)  # unknown names and options fail here
    if cfg.size < min_input_size(cfg.arch, **cfg.options):
        raise ConfigError(f"size {cfg.size} is too small for critic {cfg.arch!r} "
                          f"(at least {min_input_size(cfg.arch, **cfg.options)} px)")
    splits = read_dataset(cfg.data)[0]
    valid_split = "valid" if splits.get("valid") else "test"
    # the fakes are this generator's predictions: a checkpoint made against another generator is not ours
    key = config_key(cfg, RUN_KEYS) + file_digest(run / "generator.safetensors")
    last = run / "critic-checkpoints" / "last.pt"
    state = resume_state(last, key, resume, "train-critic", move=is_main(), required=("model", "epoch", "history"))
    history: list[dict[str, Any]] = []
    if state is not None:
        restore(model, state["model"], last)
        history = list(state["history"])
    if is_main():
        ensure_preds(cfg.data, run, device, ("train", valid_split))
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "train-critic.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        _write_history(run, history)  # in step with the checkpoint (rows past it dropped)
    barrier()  # the other ranks wait for rank 0's predictions
    start = int(state["epoch"]) if state is not None else 0
    if start < cfg.epochs:  # else the checkpoint is at the end: only the final file is missing
        dls = make_critic_dataloaders(cfg.data, run, cfg.size, cfg.bs, device=device, num_workers=cfg.num_workers,
                                      seed=cfg.seed, channels_last=cfg.channels_last)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # --compile: the critic's training forward, in place (critic.safetensors and the checkpoints keep their
        # keys); validation runs eagerly (`srgan.runtime.compile_module`). No graph breaks in any critic.
        model = compile_module(model, cfg.compile, device, grad_only=True)
        board = None
        if cfg.log == "tensorboard" and is_main():  # RUN/critic-tensorboard/, its steps going on from the checkpoint's
            from srgan.callbacks import TensorBoardLog, TensorBoardLosses

            board = TensorBoardLog(run / "critic-tensorboard", int(state.get("steps") or 0) if state else 0)
            extra_cbs = [TensorBoardLosses(board), *(extra_cbs or [])]
        cbs = [StopOnNonFinite(), _critic_epoch_end(run, history, key, write=is_main(), state=state,
                                                    every=cfg.checkpoint_every, stop=stop, board=board),
               *gradient_callbacks(cfg.grad_accum, cfg.grad_clip), *(extra_cbs or [])]
        if ddp is not None:
            cbs.append(ddp)
        if precision in ("bf16", "fp16"):
            cbs.append(DeviceMixedPrecision(amp_mode=precision))
        learn = Learner(dls, model.to(device), loss_func=patch_bce, opt_func=adam(cfg.betas, cfg.eps, cfg.wd),
                        wd=cfg.wd, metrics=[AvgMetric(patch_accuracy)], cbs=cbs, path=run,
                        model_dir="critic-checkpoints")
        if not progress or not is_main():
            quiet(learn)
        learn.create_opt()
        if state is not None:
            load_optimizer_state(learn.opt, state["opt"], last)
        try:
            learn.fit_one_cycle(cfg.epochs, cfg.lr, pct_start=cfg.pct_start, moms=one_cycle_moms(cfg.betas),
                                start_epoch=start)
        finally:  # whatever stopped the run (a NaN loss, SIGTERM), its events so far are on disk
            if board is not None:
                board.close()
        model = learn.model
    final = run / "critic.safetensors"
    if is_main():
        save_critic(unwrap(model), final, extra={"epochs": cfg.epochs, "dataset": str(Path(cfg.data).resolve()),
                                                 "accuracy": history[-1]["accuracy"] if history else None})
    finish()  # the other ranks wait for the file, then all leave the process group
    return final


def _write_history(run: Path, history: list[dict[str, Any]]) -> None:
    write_csv_atomic(run / "critic-history.csv", HISTORY_COLUMNS, history)


def _critic_epoch_end(run: Path, history: list[dict[str, Any]], key: str, write: bool = True,
                      state: dict[str, Any] | None = None, every: int | None = None,
                      stop: StopRequest | None = None, board: Any = None):
    """train-critic's `srgan.callbacks.EpochEnd` (fastai imported on use): after each epoch the checkpoint (with
    the history), then critic-history.csv from it; checkpoints inside an epoch, SIGTERM and a resume from one as
    `srgan.callbacks.Positioned` does. `write` False on the ranks other than 0, which only set the epoch's crops;
    `state`: the checkpoint resumed; `board`: with log tensorboard, where each row also goes."""
    from srgan.callbacks import EpochEnd, history_value

    class CriticEpochEnd(EpochEnd):
        def row(self, epoch: int, values: dict[str, Any]) -> dict[str, Any]:
            return {"epoch": epoch, "train_loss": history_value(self._loss.mean),
                    "valid_loss": history_value(values.get("valid_loss")),
                    "accuracy": history_value(values.get("patch_accuracy")),
                    "seconds": round(time.perf_counter() - self._t0, 3), "data_wait": self.data_wait()}

    return CriticEpochEnd("train-critic", run / "critic-checkpoints" / "last.pt", every, stop, write, state,
                          history=history, key=key, save_checkpoint=save_checkpoint,
                          write_history=lambda: _write_history(run, history), board=board)
