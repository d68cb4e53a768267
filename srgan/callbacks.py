"""The fastai callbacks the training stages share, as top-level classes, and the helpers that go with them.

- `DeviceMixedPrecision`: fastai's MixedPrecision on the data's device (CPU bf16 too);
- `StopOnNonFinite`: a NaN/inf loss ends training with one line;
- `Positioned` and `EpochEnd`: where training is inside an epoch (checkpoints in the middle of one, SIGTERM, a
  resume from there), and after each epoch a history row, the checkpoint, then the history file — train-gen's
  and train-critic's epoch callbacks are subclasses naming their row;
- `WeightEMA` (and `ema_update`, which the GAN phase shares): an exponential moving average of the weights;
- `CountBatches`, `EpochLoss`, `quiet` (no progress bars or epoch lines), `history_value`;
- `adam` and `one_cycle_moms`: a stage's Adam (`betas`, `eps`, `wd` from its config) and the momentum schedule
  that goes with it.

This module imports fastai (~2 s) at the top, as `srgan.loader` does: the stages import it inside the functions
that train, so importing them (for their configs) stays light. Bottom layer: it imports no stage module.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision

from crappify.errors import CrappifyError, Interrupted
from srgan.distributed import unwrap
from srgan.loader import skip_samples
from srgan.runtime import StopRequest


class DeviceMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision hard-codes CUDA autocast; this one autocasts on the data's device."""

    def before_fit(self):
        with warnings.catch_warnings():  # fastai warns that CUDA autocast is off; ours replaces it below
            warnings.filterwarnings("ignore", message="CUDA is not available")
            super().before_fit()
        dtype = torch.bfloat16 if str(self.amp_mode) in ("bf16", "AMPMode.BF16") else torch.float16
        device_type = self.dls.device.type if self.dls.device is not None else "cpu"
        self.autocast = torch.autocast(device_type, dtype=dtype)
        if device_type != "cuda":
            self.learn.scaler = torch.amp.GradScaler("cpu", enabled=False)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One step of an exponential moving average of `model`'s weights (not in fastai): ema ← decay·ema +
    (1 − decay)·w for every parameter; buffers (BatchNorm statistics) are copied, as BasicSR's model_ema does."""
    for e, p in zip(ema.parameters(), unwrap(model).parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1 - decay)
    for e, b in zip(ema.buffers(), unwrap(model).buffers(), strict=True):
        e.copy_(b)


class WeightEMA(Callback):
    """An EMA copy of the model's weights (`ema`), updated after every optimiser step of training, frozen
    parameters included (they do not move, so neither does their average)."""

    order = 60  # after the step; independent of the other callbacks' order

    def __init__(self, ema: torch.nn.Module, decay: float) -> None:
        self.ema, self.decay = ema, decay

    def after_step(self):
        ema_update(self.ema, self.learn.model, self.decay)


class StopOnNonFinite(Callback):
    """A NaN or inf loss ends training with a clear message; the last checkpoint is left as it was."""

    order = 15  # after MixedPrecision.after_loss (10) has left autocast, so raising here leaves it off

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss).all():
            raise CrappifyError(f"loss became {self.loss.item()} at epoch {self.epoch + 1}, iteration "
                                f"{self.iter + 1}; the last good checkpoint is kept (lower --lr or use fp32)")


def quiet(learn: Any) -> None:
    """No progress bars and no per-epoch lines: fastai's ProgressCallback removed, the Recorder's logger
    silenced (it would print each epoch's values instead)."""
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = lambda *_: None


def adam(betas: tuple[float, float] | None, eps: float, wd: float) -> Callable[..., Any]:
    """A Learner's `opt_func`: fastai's Adam (decoupled weight decay, as AdamW) with a stage's `eps`, `wd` and
    `betas` as (mom, sqr_mom); `betas` None keeps fastai's (mom 0.9, which `fit_one_cycle` then schedules, and
    sqr_mom 0.99), so a config without them trains as before they were options."""
    from functools import partial

    from fastai.optimizer import Adam

    fixed = {} if betas is None else {"mom": betas[0], "sqr_mom": betas[1]}
    return partial(Adam, eps=eps, wd=wd, **fixed)


def one_cycle_moms(betas: tuple[float, float] | None) -> tuple[float, float, float] | None:
    """`fit_one_cycle`'s `moms`: None (fastai's, beta1 0.95 -> 0.85 -> 0.95 against the learning rate) unless
    `betas` are given, which hold beta1 for the whole run, as the recipes' sources do."""
    return None if betas is None else (betas[0],) * 3


def history_value(v: Any) -> float | str:
    """A number for a history row: "" for None, rounded to 6 decimals when finite (NaN and inf kept as they are)."""
    if v is None:
        return ""
    v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
    return round(v, 6) if math.isfinite(v) else v


class EpochLoss:
    """The mean training loss over an epoch's batches, weighted by batch size. fastai's Recorder reports an
    exponentially smoothed loss that carries over from earlier epochs, so a resumed run would log another
    value for the same epoch; this one depends on the epoch alone."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, loss: torch.Tensor, yb: tuple) -> None:
        n = int(yb[0].shape[0]) if yb else 1
        self.total += float(loss.detach()) * n
        self.count += n

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class CountBatches(Callback):
    """Adds each training batch this process runs to `owner.batches` (reported per rank under torchrun)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def after_batch(self):
        if self.training:
            self.owner.batches += 1


class Positioned(Callback):
    """The base of train-gen's and train-critic's epoch callbacks.

    It knows where training is inside an epoch (batches done, the partial `EpochLoss`), so that a checkpoint can
    be written in the middle of one — every `every` batches, or at the batch boundary after a SIGTERM — and a
    resume continues from exactly there: the loader skips the batches done (`srgan.loader.skip_samples`), and
    fastai's one-cycle position (`pct_train`, which `TrainEvalCallback` resets at each epoch start) advances as
    if they had run. Subclasses write the checkpoint (`checkpoint`), and may number epochs otherwise."""

    order = 90  # after the Recorder has the epoch's values

    def __init__(self, what: str, path: Path, every: int | None, stop: StopRequest | None, write: bool,
                 state: dict[str, Any] | None) -> None:
        self._what, self._path, self._every, self._stop, self._write = what, path, every, stop, write
        # the position a resume starts from: (completed epochs, batches of the next one done)
        self._saved = (int(state["epoch"]), int(state.get("batch") or 0)) if state is not None else None
        self._resume_at = ({k: state.get(k) for k in ("epoch", "batch", "epoch_loss", "epoch_seconds")}
                           if state is not None and state.get("batch") else None)
        self._t0: float | None = None
        self._done = 0

    def global_epoch(self) -> int:
        return self.epoch

    def checkpoint(self, position: dict[str, Any]) -> None:
        """Write the stage's checkpoint (model, optimiser, history, key) with `position` in it."""
        raise NotImplementedError

    def save(self, epoch: int, batch: int = 0) -> None:
        """The checkpoint at (`epoch` completed epochs, `batch` batches of the next one done)."""
        if self._write:
            position: dict[str, Any] = {"epoch": epoch}
            if batch:
                position.update(batch=batch, epoch_loss=[self._loss.total, self._loss.count],
                                epoch_seconds=time.perf_counter() - self._t0)
            self.checkpoint(position)
        self._saved = (epoch, batch)

    def before_epoch(self):  # not reached for the epochs fastai's SkipToEpoch cancels on resume
        self._t0, self._loss, self._done = time.perf_counter(), EpochLoss(), 0
        epoch = self.global_epoch()
        for dl in (self.dls.train, self.dls.valid):
            dl.dataset.set_epoch(epoch)
        at = self._resume_at
        if at is not None and int(at["epoch"]) == epoch:  # resumed inside this epoch
            self._resume_at = None
            self._done = int(at["batch"])
            self._loss.total, self._loss.count = float(at["epoch_loss"][0]), int(at["epoch_loss"][1])
            self._t0 -= float(at.get("epoch_seconds") or 0.0)
            skip_samples(self.dls.train, self._done * self.dls.train.bs)

    def before_train(self):
        if self._done:  # the schedule goes on where the interrupted run was, added up as fastai adds it
            step = 1.0 / (len(self.dls.train) * self.n_epoch)
            for _ in range(self._done):
                self.learn.pct_train += step
            self.learn.train_iter += self._done

    def before_batch(self):
        self._check_stop()

    def after_batch(self):
        if self.training and self._t0 is not None:
            self._loss.add(self.learn.loss, self.learn.yb)
            self._done += 1
            if self._every and self._done % self._every == 0 and self._done < len(self.dls.train):
                self.save(self.global_epoch(), self._done)
        self._check_stop()

    def _check_stop(self):
        if self._stop is None or not self._stop.requested or self._t0 is None:
            return
        self._stop.acted = True
        epoch, n = self.global_epoch(), len(self.dls.train)
        where = f"{self._what} stopped by SIGTERM in epoch {epoch + 1} after batch {self._done} of {n}"
        if not self.training:
            where += " (during validation)"
        if (epoch, self._done) == (0, 0) and self._saved is None:
            raise Interrupted(f"{where}: nothing trained yet, nothing saved")
        if (epoch, self._done) != self._saved:
            self.save(epoch, self._done)
            raise Interrupted(f"{where}; saved {self._path}")
        raise Interrupted(f"{where}; {self._path} is at that point")


class EpochEnd(Positioned):
    """After each epoch: a history row (`row`, from the Recorder's values), the epoch's other outputs
    (`outputs`), the checkpoint (with the history), then the history file from it — so the history file is never
    ahead of the checkpoint, and a resume rewrites it from the checkpoint. Ranks other than 0 (`write` False)
    only keep the position.

    The checkpoint at `path` holds the model (unwrapped from DDP), the optimiser state, the position, `history`
    and `key`, written by `save_checkpoint(path, state)`; `write_history()` writes the history file. Both are
    given by the stage (whose module names them, so a test can replace them there)."""

    def __init__(self, what: str, path: Path, every: int | None, stop: StopRequest | None, write: bool,
                 state: dict[str, Any] | None, *, history: list[dict[str, Any]], key: str,
                 save_checkpoint: Callable[[Path, dict[str, Any]], None],
                 write_history: Callable[[], None]) -> None:
        super().__init__(what, path, every, stop, write, state)
        self._history, self._key = history, key
        self._save_checkpoint, self._write_history = save_checkpoint, write_history

    def row(self, epoch: int, values: dict[str, Any]) -> dict[str, Any]:
        """The history row of `epoch` (counted from 1) from the Recorder's values of it (valid_loss, metrics)."""
        raise NotImplementedError

    # The time the training loop waited for its data this epoch (the loader's next batch, its transfer to the
    # device and the batch transforms: what happens between one batch's end and the next one's start), as a
    # share of the epoch's training time: `data_wait` in the history, the figure that says whether the loader
    # keeps up with the model (benchmarks/README.md).
    def before_train(self):
        super().before_train()
        self._waited, self._trained, self._mark = 0.0, 0.0, time.perf_counter()

    def before_batch(self):
        super().before_batch()
        if self.training:
            now = time.perf_counter()
            self._waited += now - self._mark
            self._trained += now - self._mark
            self._mark = now

    def after_batch(self):
        super().after_batch()
        if self.training:
            now = time.perf_counter()
            self._trained += now - self._mark
            self._mark = now

    def data_wait(self) -> float | str:
        """The share of this epoch's training time spent waiting for data ("" before any batch ran)."""
        trained = getattr(self, "_trained", 0.0)
        return round(self._waited / trained, 4) if trained > 0 else ""

    def outputs(self, epoch: int) -> None:
        """Anything else the stage writes after an epoch (previews), before its checkpoint."""

    def checkpoint(self, position: dict[str, Any]) -> None:
        self._save_checkpoint(self._path, {"model": unwrap(self.learn.model).state_dict(),
                                           "opt": self.learn.opt.state_dict(), **position,
                                           "history": self._history, "config_key": self._key})

    def after_epoch(self):
        if self._t0 is None:  # an epoch fastai skipped on resume (nothing trained)
            return
        epoch = self.global_epoch() + 1
        if not self._write:  # not rank 0: it only keeps the position
            self.save(epoch)
            self._t0 = None
            return
        names = self.recorder.metric_names[1:-1]  # drop 'epoch' and 'time'
        values = dict(zip(names, self.recorder.log[1:-1], strict=False))
        self._history.append(self.row(epoch, values))
        self.outputs(epoch)
        self.save(epoch)
        self._write_history()
        self._t0 = None

