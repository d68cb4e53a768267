"""The fastai callbacks the training stages share, as top-level classes, and the helpers that go with them.

- `DeviceMixedPrecision`: fastai's MixedPrecision on the data's device (CPU bf16 too);
- `StopOnNonFinite`: a NaN/inf loss ends training with one line;
- `Positioned` and `EpochEnd`: where training is inside an epoch (checkpoints in the middle of one, SIGTERM, a
  resume from there), and after each epoch a history row, the checkpoint, then the history file — train-gen's
  and train-critic's epoch callbacks are subclasses naming their row;
- `WeightEMA` (and `ema_update`, which the GAN phase shares): an exponential moving average of the weights;
- `BatchGradientAccumulation` and `gradient_callbacks`: fastai's GradientAccumulation (counted in batches, a group
  never spanning an epoch end, its pending gradient in step checkpoints) and GradientClip, from a stage's
  `grad_accum` and `grad_clip`;
- `CountBatches`, `EpochLoss`, `quiet` (no progress bars or epoch lines), `history_value`;
- `adam` and `one_cycle_moms`: a stage's Adam (`betas`, `eps`, `wd` from its config) and the momentum schedule
  that goes with it;
- `TensorBoardLog`, `TensorBoardLosses` and `loss_terms`: `--log tensorboard`'s event files, which every training
  stage (train-gan included) writes through.

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
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.torch_core import find_bs

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
        self.ema, self.decay, self._cancelled = ema, decay, False

    # Only real steps count. A batch that only adds to an accumulated gradient (`BatchGradientAccumulation`)
    # never reaches `after_step`; a step fp16's GradScaler skips (inf/NaN gradients) does, after this.
    def after_cancel_step(self):
        self._cancelled = True

    def after_step(self):
        if self._cancelled:
            self._cancelled = False
            return
        ema_update(self.ema, self.learn.model, self.decay)


def _grad_scale(learn: Any) -> float:
    """The factor fp16's GradScaler has multiplied the gradients by so far (1 without one, or with it disabled)."""
    scaler = getattr(learn, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


class BatchGradientAccumulation(GradientAccumulation):
    """fastai's GradientAccumulation, counted in batches: the gradients of `batches` training batches are summed,
    each batch's loss weighted by its share of the group's samples, before one optimiser step (and zero_grad) —
    the step of a `batches` times larger batch in the memory of one.

    fastai's callback counts samples (its `n_acc`), so `n_acc` is set to `batches` x the training loader's batch
    at each fit (a schedule's stages change the batch). Its groups also run on across epoch ends and fits; here a
    group never spans an epoch end: the count restarts with each epoch, and when an epoch's batches do not divide
    into whole groups its last batch steps with the short group, the gradient rescaled to the mean over that
    group's samples (as a loader of larger batches that keeps its short last batch would). So nothing is pending at
    an epoch's end (its checkpoint, validation, the next phase); a group open at a step checkpoint is saved in it
    (`pending`) and taken up again on resume (`resume`). fastai's order (6) puts `before_step` ahead of
    MixedPrecision's (10) and GradientClip's (11): a batch that only adds to the group skips the GradScaler, the
    clipping and the step, and `after_step` callbacks (WeightEMA, the scaler's update) see real steps only."""

    def __init__(self, batches: int) -> None:
        super().__init__(n_acc=batches)
        self.batches, self.seen = batches, 0

    def before_fit(self):
        self.count, self.n_acc = 0, self.batches * self.dls.train.bs

    def before_epoch(self):
        self.count, self.seen = 0, 0

    def before_step(self):
        self.count += find_bs(self.learn.yb)
        if self.count < self.n_acc:
            if self.seen + 1 < self.n_iter:  # not the epoch's last batch: no step, no zero_grad
                raise CancelBatchException()
            with torch.no_grad():  # the epoch's last, short group: the mean over its samples
                for p in self.learn.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(self.n_acc / self.count)
        self.count = 0

    def after_batch(self):  # also after a batch that only accumulated (fastai calls it after the cancel)
        if self.training:
            self.seen += 1

    def pending(self) -> dict[str, Any]:
        """What a step checkpoint holds of an open group: its summed gradient so far (divided by fp16's loss scale,
        which a resumed run starts afresh) and its sample count; nothing when no group is open."""
        if not self.count:
            return {}
        scale = _grad_scale(self.learn)
        grads = {name: (p.grad.detach().float() / scale).cpu()
                 for name, p in unwrap(self.learn.model).named_parameters() if p.grad is not None}
        return {"accum_grads": grads, "accum_count": self.count}

    def resume(self, state: dict[str, Any], batches_done: int, path: Path) -> None:
        """Go on inside an epoch after `batches_done` batches, with the open group `state` saved (`pending`)."""
        self.seen = batches_done
        grads, count = state.get("accum_grads"), state.get("accum_count")
        if not grads or not count:
            return
        params = dict(unwrap(self.learn.model).named_parameters())
        for name, g in grads.items():
            p = params.get(name)
            if p is None or p.shape != g.shape:
                raise CrappifyError(f"checkpoint {path}: its accumulated gradient {name!r} does not fit the model; "
                                    "move the file away to start from the beginning")
        scale = _grad_scale(self.learn)
        for name, g in grads.items():
            params[name].grad = (g * scale).to(params[name].device, params[name].dtype)
        self.count = int(count)


def gradient_callbacks(grad_accum: int, grad_clip: float | None) -> list[Callback]:
    """A stage's `grad_accum` and `grad_clip` as fastai callbacks: `BatchGradientAccumulation` when more than one
    batch makes a step, fastai's GradientClip (the total L2 norm of the gradient, at most `grad_clip`, before each
    step; with fp16 after MixedPrecision has unscaled it, by fastai's order) when given."""
    cbs: list[Callback] = []
    if grad_accum > 1:
        cbs.append(BatchGradientAccumulation(grad_accum))
    if grad_clip is not None:
        cbs.append(GradientClip(max_norm=grad_clip))
    return cbs


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
        self._resume_at = ({k: state.get(k) for k in ("epoch", "batch", "epoch_loss", "epoch_seconds",
                                                       "accum_grads", "accum_count")}
                           if state is not None and state.get("batch") else None)
        self._t0: float | None = None
        self._done = 0
        # training batches of the whole run (every phase, across resumes): TensorBoard's global step
        self.steps = int(state.get("steps") or 0) if state is not None else 0

    def global_epoch(self) -> int:
        return self.epoch

    def checkpoint(self, position: dict[str, Any]) -> None:
        """Write the stage's checkpoint (model, optimiser, history, key) with `position` in it."""
        raise NotImplementedError

    def save(self, epoch: int, batch: int = 0) -> None:
        """The checkpoint at (`epoch` completed epochs, `batch` batches of the next one done)."""
        if self._write:
            position: dict[str, Any] = {"epoch": epoch, "steps": self.steps}
            if batch:
                position.update(batch=batch, epoch_loss=[self._loss.total, self._loss.count],
                                epoch_seconds=time.perf_counter() - self._t0)
                acc = self._accumulation()
                if acc is not None:  # a gradient group open at this batch boundary
                    position.update(acc.pending())
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
            acc = self._accumulation()
            if acc is not None:
                acc.resume(at, self._done, self._path)

    def _accumulation(self) -> BatchGradientAccumulation | None:
        return next((cb for cb in self.learn.cbs if isinstance(cb, BatchGradientAccumulation)), None)

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
            self.steps += 1
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
    given by the stage (whose module names them, so a test can replace them there). `board` (`--log tensorboard`,
    rank 0): each row also goes there, at the run's global step, which this callback keeps it at."""

    def __init__(self, what: str, path: Path, every: int | None, stop: StopRequest | None, write: bool,
                 state: dict[str, Any] | None, *, history: list[dict[str, Any]], key: str,
                 save_checkpoint: Callable[[Path, dict[str, Any]], None],
                 write_history: Callable[[], None], board: TensorBoardLog | None = None) -> None:
        super().__init__(what, path, every, stop, write, state)
        self._history, self._key = history, key
        self._save_checkpoint, self._write_history = save_checkpoint, write_history
        self.board = board
        if board is not None:
            board.step = self.steps

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
            if self.board is not None:
                self.board.step = self.steps

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
        if self.board is not None:  # the events up to a checkpoint are on disk with it
            self.board.flush()

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
        if self.board is not None:
            self.board.row(self._history[-1])
        self.outputs(epoch)
        self.save(epoch)
        self._write_history()
        self._t0 = None



# --------------------------------------------------------------------------------------------------------
# --log tensorboard
#
# fastai's TensorBoardCallback is not used: its step is the Learner's `train_iter`, which restarts at 0 in every
# `fit` call (train-gen's frozen and unfrozen phases, every resume), so phases and resumed runs would write over
# each other's steps; it logs fastai's smoothed loss and the Recorder's values, not our history rows (the
# epoch's mean loss, bicubic's PSNR, data_wait, ...) nor the terms of our losses; its `after_batch` writes during
# validation too; it traces the model graph (slow for a U-Net, and refused under mixed precision) and logs
# predictions through fastai's typed data, which ours is not. The writer below is torch's SummaryWriter, which
# it also uses.


def loss_terms(loss: Any, prefix: str = "loss") -> dict[str, float]:
    """The latest call's terms of a stage's loss, for TensorBoard: each part of a `srgan.losses.CombinedLoss`
    unweighted (`loss/feature`, `loss/tv`), and the weighted terms of a part that keeps them (FeatureLoss's
    pixel, feat_i and gram_i: `loss/feature/pixel`). Empty for any other loss."""
    out: dict[str, float] = {}
    last = getattr(loss, "last", None)
    if not isinstance(last, dict):
        return out
    for name, value in last.items():
        out[f"{prefix}/{name}"] = float(value)
        part = loss.parts[name] if hasattr(loss, "parts") else None
        for term, v in (getattr(part, "terms", None) or {}).items():
            out[f"{prefix}/{name}/{term}"] = float(v)
    return out


class TensorBoardLog:
    """One stage's TensorBoard event files in `folder` (`--log tensorboard`; made on rank 0 only).

    `step` is the run's global step — training batches (train-gen, train-critic) or GAN steps (train-gan) since
    the run began, resumes included — which the stage keeps current and every write uses unless given another.
    The writer is opened at the first write with `purge_step` the step after the one the run started from, so
    TensorBoard hides what a killed run wrote past the checkpoint this one resumed (or, started afresh, all of an
    earlier run's events in the folder) instead of drawing both. Nothing is written (no file made) before then."""

    def __init__(self, folder: str | Path, step: int = 0) -> None:
        self.folder, self.step = Path(folder), step
        self._purge: int | None = step + 1  # only the first writer purges (one reopened after `close` does not)
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder), purge_step=self._purge)
            self._purge = None
        return self._writer

    def scalars(self, values: dict[str, Any], step: int | None = None) -> None:
        """`values` as scalars; None skipped. NaN and inf are written, then flushed at once: which term went NaN is
        what one looks for, and the run is about to stop on it."""
        step = self.step if step is None else step
        finite = True
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
                finite = finite and math.isfinite(float(value))
        if not finite:
            self.flush()

    def row(self, row: dict[str, Any], prefix: str = "history", step: int | None = None) -> None:
        """Every column of a history row under `prefix/`: numbers (True/False as 1/0) as scalars, words (a phase,
        the network trained) as text; empty cells (the loss of a network that did not train) skipped."""
        step = self.step if step is None else step
        for column, value in row.items():
            if value is None or value == "":
                continue
            if isinstance(value, (bool, int, float)):
                self.writer.add_scalar(f"{prefix}/{column}", float(value), step)
            else:
                self.writer.add_text(f"{prefix}/{column}", str(value), step)

    def image(self, tag: str, image: Any, step: int | None = None) -> None:
        """An H×W×3 uint8 image (a preview grid)."""
        self.writer.add_image(tag, image, self.step if step is None else step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardLosses(Callback):
    """`--log tensorboard` per training batch of a Learner (train-gen, train-critic): the batch's loss, each of its
    terms (`loss_terms`) and every parameter group's learning rate (`lr`, or `lr/<group>` with discriminative
    rates), at the global step the batch makes.

    Order 12: after MixedPrecision's after_loss (10), before StopOnNonFinite's (15), so the batch whose loss is
    NaN is written (and flushed) before that stops the run."""

    order = 12

    def __init__(self, board: TensorBoardLog, groups: tuple[str, ...] = ()) -> None:
        self.board, self.groups = board, groups

    def after_loss(self):
        if not self.training:
            return
        step = self.board.step + 1
        values = {"loss/total": float(self.learn.loss.detach()), **loss_terms(self.learn.loss_func)}
        hypers = self.learn.opt.hypers
        for i, h in enumerate(hypers):
            name = "lr" if len(hypers) == 1 else f"lr/{self.groups[i] if i < len(self.groups) else i}"
            values[name] = h["lr"]
        self.board.scalars(values, step)
