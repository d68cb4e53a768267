"""`train-gen`: pretrain the generator with a (feature) loss through a fastai Learner — the "NoGAN" stage.

Schedule: a list of stages (progressive resizing), each `{size, bs, epochs, lr}`. With a pretrained
encoder each stage runs `epochs` with the encoder frozen at `lr`, then `epochs` unfrozen with
discriminative rates `slice(lr / 100, lr)` — the fastai course's sequence; from random weights, only
the unfrozen half runs. The optimiser is fastai's Adam with decoupled weight decay, its `betas`, `eps` and `wd`
from the config; by default fastai's (beta1 following the one-cycle schedule, eps 1e-5). Every epoch ends with a
checkpoint (model + optimiser + position in the schedule), a row in `history.csv` and a preview grid;
`checkpoint_every` N adds one every N batches of an epoch, and SIGTERM writes one at the next batch boundary and
stops (`Interrupted`). `resume` continues from the checkpoint's position, an epoch end or inside an epoch, and
stops at the same total. The finished generator is `RUN/generator.safetensors`. `val_hr` also scores each epoch on
a benchmark folder as `evaluate --hr` does (val_psnr_y, val_ssim_y); `keep_best` keeps the best epoch's generator
as `RUN/generator-best.safetensors`. `grad_clip` and `grad_accum` add fastai's GradientClip and GradientAccumulation
(`srgan.callbacks.gradient_callbacks`); `Trainer.lr_find` runs fastai's lr_find on the first phase's learner and
writes only RUN/lr_find.png and RUN/lr_find.json.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from crappify.imageio import save_image_atomic, write_atomic, write_csv_atomic
from crappify.preview import grid
from srgan.checkpoint import (
    config_key,
    load_optimizer_state,
    restore,
    resume_state,
    save_checkpoint,
    save_generator,
)
from srgan.data import data_scale, make_dataloaders, read_dataset
from srgan.distributed import (
    distributed_callback,
    finish,
    is_distributed,
    is_main,
    local_device,
    rank,
    run_folder,
    unwrap,
    world_size,
)
from srgan.generators import (
    NO_IMAGENET_WEIGHTS,
    has_option,
    is_unet,
    is_unet_arch,
)
from srgan.losses import LossSpec
from srgan.normalize import Normalizer
from srgan.runtime import (
    MAX_BATCH,
    MAX_CROP,
    MAX_PREVIEW,
    AdamOptions,
    RunOptions,
    StepOptions,
    StopRequest,
    compile_module,
    course_batch,
    largest_batch,
    resolve_device,
    resolve_precision,
    sigterm_stops,
)

HISTORY_COLUMNS = ["epoch", "stage", "phase", "size", "bs", "train_loss", "valid_loss", "psnr", "bicubic_psnr",
                   "ssim", "below_bicubic", "seconds", "data_wait"]
VAL_COLUMNS = ["val_psnr_y", "val_ssim_y"]  # with val_hr: the whole validation folder, BasicSR's PSNR/SSIM-Y
PERCEPTUAL_LOSSES = ("feature", "vgg19", "vgg")

# Defaults that depend on where training starts. A pretrained encoder: the fastai course's settings. From random
# weights (the demo, unet-small, srresnet, --no-pretrained): a residual generator (it starts as the bicubic
# baseline), a pixel loss (a perceptual loss on a random VGG measures nothing perceptual), and the schedule the
# demo converges with on a 2-core CPU (benchmarks/README.md).
PRETRAINED_DEFAULTS: dict[str, Any] = {"size": 128, "bs": 8, "lr": 1e-3}
SCRATCH_DEFAULTS: dict[str, Any] = {"size": 64, "bs": 16, "lr": 2e-3}
# From a trained model (`init`): fine-tuning, at Real-ESRGAN's fine-tuning rate (finetune_realesrgan_x4plus: 1e-4).
INIT_DEFAULTS: dict[str, Any] = {"size": 64, "bs": 16, "lr": 1e-4}
# Options that say how to run, or how long (a resume may extend a run), not what is trained: a checkpoint
# written under other values of these is still this config's (`srgan.checkpoint.config_key`).
RUN_KEYS = frozenset({"device", "precision", "channels_last", "num_workers", "epochs", "preview_items",
                      "checkpoint_every", "compile", "val_hr", "val_lr", "keep_best", "log"})


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(ge=8, le=MAX_CROP)
    bs: int = Field(ge=1, le=MAX_BATCH)
    epochs: int = Field(ge=1)
    lr: float | None = Field(None, gt=0, description="default: the run's lr")


class TrainGenConfig(RunOptions, AdamOptions, StepOptions):
    """Options of `crappify train-gen` (also the keys of its `--config` YAML file)."""

    data: str
    out: str
    arch: str = "unet-resnet34"
    options: dict[str, Any] = Field(default_factory=dict, description="generator options (blur, self_attention...)")
    loss: LossSpec = Field(
        None, description="default: feature when pretrained, else l1; {name: weight} or {name: {weight: w, option: v}}")
    size: int | None = Field(None, ge=8, le=MAX_CROP, description="default: 128 when pretrained, else 64")
    bs: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Literal["auto"] | None = Field(
        None, description="default: on CUDA the fastai course's (32 at 128 px, 12 at 256 px), else 8 when pretrained, "
                          "16 from scratch; auto: on CUDA the largest batch that fits, found by a short probe "
                          "(the course's on the CPU); the batch used is what train-gen.yaml records")
    epochs: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="default: 1e-3 when pretrained, else 2e-3")
    stages: list[Stage] | None = Field(None, description="progressive resizing; replaces size/bs/epochs/lr")
    pct_start: float = Field(0.3, gt=0, lt=1)
    pretrained: bool = True
    weights: str | None = None
    init: str | None = Field(None, description="start from this trained generator: a crappify generator file, or a "
                             "BasicSR / Real-ESRGAN / OpenModelDB .pth or .safetensors of an rrdb or compact model; "
                             "its architecture and options are the run's")
    loss_weight_files: dict[str, str] | None = Field(
        None, description="local weight files for the loss networks, keyed by loss (feature), network "
                          "(vgg16_bn) or torchvision weights name; default: torchvision's cache")
    preview_items: int = Field(4, ge=0, le=MAX_PREVIEW)
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N batches of an epoch")
    degrade: Literal["offline", "online"] = Field(
        "offline", description="offline: train on the dataset's LR files; online: degrade each HR crop in the "
        "loader, afresh every epoch (Real-ESRGAN); validation reads the LR files either way")
    degrade_preset: str | None = Field(
        None, description="degrade: online only: a built-in preset name or a YAML file; default: the dataset's own")
    sharpen_gt: bool = Field(False, description="train towards USM-sharpened HR crops (Real-ESRGAN); online, the LR "
                             "is degraded from the sharpened crop, as Real-ESRGAN degrades its sharpened GT; offline, "
                             "the LR files are the plain HR's; validation scores against the plain HR")
    ema: bool = Field(False, description="also keep an exponential moving average of the weights, written as "
                                         "RUN/generator-ema.safetensors (Real-ESRNet's net_g_ema)")
    ema_decay: float = Field(0.999, gt=0, lt=1)
    val_hr: str | None = Field(None, description="also validate every epoch on a benchmark folder of HR images "
                               "(Set5/GTmod12), whole images scored as `evaluate --hr` scores them: val_psnr_y and "
                               "val_ssim_y in history.csv")
    val_lr: str | None = Field(None, description="val_hr's LR images, matched by stem (baby.png: baby.png or "
                               "babyx4.png); default: made from each HR by bicubic at the dataset's scale")
    keep_best: Literal["psnr", "ssim", "val_psnr_y", "val_ssim_y"] | None = Field(
        None, description="also write RUN/generator-best.safetensors after each epoch whose value of this history "
                          "column beats every earlier epoch's (val_*: needs val_hr)")

    @model_validator(mode="after")
    def _validation_folder(self) -> TrainGenConfig:
        """The val_* options only with a validation folder."""
        if self.val_hr is None and self.val_lr is not None:
            raise ValueError("--val-lr goes with --val-hr (the HR folder it pairs with)")
        if self.val_hr is None and self.keep_best in ("val_psnr_y", "val_ssim_y"):
            raise ValueError(f"--keep-best {self.keep_best} needs --val-hr DIR (the folder it is measured on)")
        return self



    def encoder_pretrained(self) -> bool:
        """Whether training starts from ImageNet weights (a U-Net's encoder) rather than random weights."""
        return (self.pretrained and self.init is None and is_unet_arch(self.arch)
                and self.arch not in NO_IMAGENET_WEIGHTS)

    def _from_init(self) -> dict[str, Any]:
        """With `init`: the arch and options of the model in that file (one line where the config says otherwise)."""
        from crappify.errors import ConfigError
        from srgan.basicsr import start_spec

        if self.weights is not None:
            raise ConfigError("give --init (a trained generator) or --weights (an encoder's ImageNet weights), not "
                              "both")
        arch, _, options = start_spec(self.init)
        if "arch" in self.model_fields_set and self.arch != arch:
            raise ConfigError(f"--init {self.init} holds a {arch} generator, not the configured {self.arch}")
        for key, value in self.options.items():
            if options.get(key) != value:
                raise ConfigError(f"--init {self.init}: its generator option {key} is {options.get(key)!r}, not the "
                                  f"configured {value!r}")
        return {"arch": arch, "options": options}

    def resolved(self, device_type: str = "cpu") -> TrainGenConfig:
        """This config with every start-dependent default filled in (what runs, and what train-gen.yaml saves), for a
        device of `device_type`: on CUDA the batch defaults to the course's for the crop size, and `bs: auto` stays
        for the trainer to probe; elsewhere `auto` is the course's batch."""
        if self.init is not None:
            return self.model_copy(update=self._from_init())._resolved(device_type, INIT_DEFAULTS)
        return self._resolved(device_type, PRETRAINED_DEFAULTS if self.encoder_pretrained() else SCRATCH_DEFAULTS)

    def _resolved(self, device_type: str, defaults: dict[str, Any]) -> TrainGenConfig:
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        if (self.bs is None and device_type == "cuda") or (self.bs == "auto" and device_type != "cuda"):
            values["bs"] = course_batch(values["size"])
        # the loss follows the loss network's weights (`pretrained`), not the encoder's
        values["loss"] = self.loss if self.loss is not None else ("feature" if self.pretrained else "l1")
        # residual where the arch has it (compact has its own nearest-neighbour skip)
        options = ({"residual": not self.encoder_pretrained()}
                   if has_option(self.arch, "residual") and self.init is None else {})
        options = {**options, **self.options}
        stages = None
        if self.stages:
            stages = [st.model_copy(update={"lr": st.lr if st.lr is not None else values["lr"]}) for st in self.stages]
        return self.model_copy(update={**values, "options": options, "stages": stages})

    def schedule(self) -> list[Stage]:
        """The stages to run, with the start-dependent defaults filled in (`resolved`)."""
        cfg = self.resolved()
        return cfg.stages or [Stage(size=cfg.size, bs=cfg.bs, epochs=cfg.epochs, lr=cfg.lr)]


@dataclass(frozen=True)
class Phase:
    """One `fit_one_cycle` call of the schedule."""

    stage: int
    frozen: bool
    size: int
    bs: int
    epochs: int
    lr: float


def plan_phases(cfg: TrainGenConfig, encoder_pretrained: bool) -> list[Phase]:
    """The phases: per stage, frozen then unfrozen for a pretrained encoder, unfrozen only otherwise."""
    phases = []
    for i, st in enumerate(cfg.schedule()):
        if encoder_pretrained:
            phases.append(Phase(i, True, st.size, st.bs, st.epochs, st.lr))
        phases.append(Phase(i, False, st.size, st.bs, st.epochs, st.lr))
    return phases


def _perceptual(loss: str | dict[str, Any]) -> bool:
    names = [loss] if isinstance(loss, str) else list(loss)
    return any(n in PERCEPTUAL_LOSSES for n in names)


def _loss_name(loss: str | dict[str, Any]) -> str:
    return loss if isinstance(loss, str) else "+".join(loss)


def _metrics(normalizer: Normalizer):
    """Validation PSNR and SSIM of the generator, and the PSNR of the bicubic baseline on the same crops, so
    every epoch line shows whether the model does better than doing nothing."""
    from fastai.metrics import AvgMetric, Metric
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from srgan.upsample import resize_tensor

    def psnr(pred, targ):
        return peak_signal_noise_ratio(normalizer.denormalize(pred), normalizer.denormalize(targ), data_range=1.0)

    def ssim(pred, targ):
        return structural_similarity_index_measure(normalizer.denormalize(pred), normalizer.denormalize(targ),
                                                   data_range=1.0)

    class BicubicPSNR(Metric):
        """PSNR of the model's input upsampled to the target size (a U-Net's input already is) — the baseline."""

        def reset(self):
            self.total, self.count = 0.0, 0

        def accumulate(self, learn):
            x, y = learn.xb[0], learn.yb[0]
            if x.shape[-2:] != y.shape[-2:]:
                x = resize_tensor(x, tuple(y.shape[-2:]))
            n = y.shape[0]
            self.total += float(psnr(x, y)) * n
            self.count += n

        @property
        def value(self):
            return self.total / self.count if self.count else None

        @property
        def name(self):
            return "bicubic_psnr"

    return [AvgMetric(psnr), BicubicPSNR(), AvgMetric(ssim)]


class Trainer:
    """Runs a `TrainGenConfig` into a run directory (see the module docstring)."""

    def __init__(self, cfg: TrainGenConfig, resume: bool = False, progress: bool = True,
                 cbs: list | None = None) -> None:
        self.device = local_device(resolve_device(cfg.device))
        cfg = cfg.resolved(self.device.type)
        self.cfg, self.resume, self.progress, self.extra_cbs = cfg, resume, progress, list(cbs or [])
        self.run = Path(cfg.out)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.normalizer = Normalizer()
        _, self.data_config = read_dataset(cfg.data)
        self.data_scale = data_scale(self.data_config)
        self.history: list[dict[str, Any]] = []
        self.batches = 0  # training batches this process ran (reported per rank under torchrun)
        self.stop: StopRequest | None = None  # set while `fit` runs
        self.ema: torch.nn.Module | None = None  # the EMA copy of the weights, with `ema`
        self.board: Any = None  # RUN/tensorboard/'s writer (srgan.callbacks.TensorBoardLog), with log tensorboard
        self.val_set = self._val_set() if cfg.val_hr is not None and is_main() else None

    # -- building blocks -------------------------------------------------------------------------------
    def _val_set(self):
        """`val_hr` as `evaluate --hr` reads it, at the dataset's scale (checked before any training)."""
        from crappify.errors import ConfigError
        from srgan.benchmarks import benchmark_test_set

        cfg = self.cfg
        if cfg.val_lr is None and self.data_scale == 1:
            raise ConfigError(f"--val-hr {cfg.val_hr}: the dataset {cfg.data} has no scale to make the LR with (its "
                              "LR size is fixed); give the LR images too (--val-lr DIR)")
        return benchmark_test_set(cfg.val_hr, cfg.val_lr, self.data_scale)

    def _model(self):
        from srgan.generators import build_generator

        first = self.cfg.schedule()[0]
        arch = self.cfg.arch
        scale = 1 if is_unet_arch(arch) else self.data_scale
        if self.cfg.init is not None:
            return self._init_model(scale)
        model = build_generator(arch, scale=scale, img_size=first.size,
                                pretrained=self.cfg.pretrained, weights=self.cfg.weights, **self.cfg.options)
        return model, is_unet(model)

    def _init_model(self, scale: int):
        """The generator in `init`, checked to upsample as this dataset needs."""
        from crappify.errors import ConfigError
        from srgan.basicsr import load_start_generator

        model = load_start_generator(self.cfg.init).train()
        have = model.crappify_spec["scale"]
        if have != scale:
            raise ConfigError(f"--init {self.cfg.init} upsamples x{have}; the dataset {self.cfg.data} needs x{scale}"
                              f"{' (LR resized to the HR size first)' if scale == 1 else ''}")
        return model, is_unet(model)

    def _learner(self, model, loss, dls):
        import fastai.callback.progress
        import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
        from fastai.learner import Learner
        from fastai.torch_core import params

        from srgan.callbacks import CountBatches, DeviceMixedPrecision, StopOnNonFinite, adam, gradient_callbacks, quiet

        def splitter(m):  # encoder / decoder parameter groups, for freezing and discriminative rates
            return [params(m[0]), [p for mod in list(m)[1:] for p in mod.parameters()]] if is_unet(m) \
                else [params(m)]

        cfg = self.cfg
        cbs = [StopOnNonFinite(), *gradient_callbacks(cfg.grad_accum, cfg.grad_clip), *self.extra_cbs]
        if self.precision in ("bf16", "fp16"):
            cbs.append(DeviceMixedPrecision(amp_mode=self.precision))
        if is_distributed():  # DDP through fastai + Accelerate; each rank trains on its share of a batch list
            cbs.append(distributed_callback(self.device))
            cbs.append(CountBatches(self))
        learn = Learner(dls, model, loss_func=loss, opt_func=adam(cfg.betas, cfg.eps, cfg.wd), wd=cfg.wd,
                        splitter=splitter, metrics=_metrics(self.normalizer), cbs=cbs, path=self.run,
                        model_dir="checkpoints")
        if not self.progress or not is_main():
            quiet(learn)
        return learn

    def _dataloaders(self, phase: Phase, unet: bool):
        cfg = self.cfg
        return make_dataloaders(cfg.data, phase.size, phase.bs, resize_lr=unet, scale=self.data_scale,
                                device=self.device, num_workers=cfg.num_workers, seed=cfg.seed,
                                channels_last=cfg.channels_last, normalizer=self.normalizer,
                                degrade=cfg.degrade, degrade_preset=cfg.degrade_preset, sharpen_gt=cfg.sharpen_gt)

    def _probe_batch(self, model, unet: bool) -> int:
        """`bs: auto` on CUDA: the largest batch of this run's crops for which a training step of the generator and
        its loss fits (`srgan.runtime.largest_batch`), less a tenth for the optimiser's state (not yet allocated)
        and fragmentation; the smallest over the ranks under torchrun. The generator's weights and buffers (batch
        norm statistics) are put back as they were."""
        from srgan.distributed import rank_min
        from srgan.losses import build_loss

        cfg, device = self.cfg, self.device
        size = cfg.stages[0].size if cfg.stages else cfg.size
        side = size if unet else size // self.data_scale
        loss = build_loss(cfg.loss, pretrained=cfg.pretrained, weights=cfg.loss_weight_files).to(device)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.to(device).train()
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        def step(bs: int) -> None:
            try:
                x = torch.randn(bs, 3, side, side, device=device).contiguous(memory_format=fmt)
                y = torch.randn(bs, 3, size, size, device=device)
                with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
                    out = loss(model(x), y)
                out.backward()
                torch.cuda.synchronize(device)
            finally:
                model.zero_grad(set_to_none=True)

        try:
            found = largest_batch(step, course_batch(size))
        finally:
            model.load_state_dict(saved)
            torch.cuda.empty_cache()
        bs = rank_min(max(1, int(found * 0.9)))
        if is_main():
            print(f"crappify: note: bs auto: {bs} ({found} fit on {device} at {size} px)", file=sys.stderr,
                  flush=True)
        return bs

    # -- run -------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train (or continue, or finish from a final checkpoint) and write RUN/generator.safetensors.
        SIGTERM: a checkpoint at the next batch boundary, then `Interrupted`."""
        writes = ("", "checkpoints", "previews")
        with run_folder(self.run, "train-gen run", writes), sigterm_stops("train-gen") as self.stop:
            try:
                return self._fit()
            finally:  # whatever stopped the run (a NaN loss, SIGTERM), its events so far are on disk
                if self.board is not None:
                    self.board.close()

    def lr_find(self, num_it: int = 100) -> dict[str, Any]:
        """fastai's `Learner.lr_find` on the learner `fit` builds, in its first phase (the frozen encoder when it is
        pretrained, as the course runs it): up to `num_it` batches at learning rates growing exponentially from 1e-7
        to 10, ended when the loss diverges. fastai's suggestions: valley (its default), minimum (a tenth of the
        rate at the loss's minimum) and steep (the steepest descent); none when the loss diverged too soon.

        Writes RUN/lr_find.png (the smoothed loss against the rate, suggestions marked) and RUN/lr_find.json (the
        same values) atomically, and nothing else — no generator, checkpoint, history or train-gen.yaml — so an
        existing run in RUN is left as it was. Returns what lr_find.json holds."""
        from crappify.errors import ConfigError

        if is_distributed():
            raise ConfigError("--lr-find runs in one process (each rank would sweep alone); run it without torchrun")
        with run_folder(self.run, "train-gen lr-find"):
            return self._lr_find(num_it)

    def _lr_find(self, num_it: int) -> dict[str, Any]:
        import json
        import tempfile

        from fastai.callback.core import Callback, CancelFitException
        from fastai.callback.schedule import minimum, steep, valley

        from srgan.callbacks import StopOnNonFinite
        from srgan.losses import build_loss

        class EndOnNonFinite(Callback):
            """A non-finite loss is where the sweep diverged: it ends there (not with StopOnNonFinite's error)."""

            order = StopOnNonFinite.order

            def after_loss(self):
                if self.training and not torch.isfinite(self.loss).all():
                    raise CancelFitException()

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.run.mkdir(parents=True, exist_ok=True)
        model, unet = self._model()
        if cfg.bs == "auto":
            cfg = self.cfg = cfg.model_copy(update={"bs": self._probe_batch(model, unet)})
        phase = plan_phases(cfg, encoder_pretrained=unet and cfg.encoder_pretrained())[0]
        loss = build_loss(cfg.loss, pretrained=cfg.pretrained, weights=cfg.loss_weight_files)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = compile_module(model, cfg.compile, self.device, grad_only=True)
        loss = compile_module(loss, cfg.compile, self.device, grad_only=True)
        learn = self._learner(model, loss.to(self.device), self._dataloaders(phase, unet))
        learn.model.to(self.device)
        learn.remove_cb(StopOnNonFinite)
        learn.add_cb(EndOnNonFinite())
        learn.create_opt()
        learn.freeze() if phase.frozen else learn.unfreeze()
        funcs = (valley, minimum, steep)
        with tempfile.TemporaryDirectory(prefix="crappify-lr-find-") as tmp:
            learn.path = Path(tmp)  # fastai's LRFinder keeps the starting weights there, not in RUN
            try:
                found = dict(zip([f.__name__ for f in funcs],
                                 learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=funcs), strict=True))
            except (IndexError, RuntimeError, ValueError):  # too few steps before the loss diverged
                found = {}
        lrs = [float(v) for v in learn.recorder.lrs]
        losses = [float(v) for v in learn.recorder.losses]
        result = {"phase": "frozen" if phase.frozen else "unfrozen", "size": phase.size, "bs": phase.bs,
                  "grad_accum": cfg.grad_accum, "steps": len(lrs),
                  "suggestions": {k: float(v) for k, v in found.items()}, "lrs": lrs, "losses": losses}
        write_atomic(self.run / "lr_find.png", _lr_find_plot(lrs, losses, result["suggestions"]))
        write_atomic(self.run / "lr_find.json", json.dumps(result, indent=1) + "\n")
        return result

    def _fit(self) -> Path:
        from srgan.callbacks import one_cycle_moms
        from srgan.losses import build_loss

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # weight init of the decoder; data order is seeded separately
        self.run.mkdir(parents=True, exist_ok=True)
        model, unet = self._model()
        if cfg.bs == "auto":  # on CUDA: the largest batch that fits, probed once, then recorded like any other
            cfg = self.cfg = cfg.model_copy(update={"bs": self._probe_batch(model, unet)})
        if is_main():
            write_atomic(self.run / "train-gen.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            # RUN/preds/ is left alone: it records which generator it holds, and is rewritten when that changes
        phases = plan_phases(cfg, encoder_pretrained=unet and cfg.encoder_pretrained())
        if not cfg.pretrained and _perceptual(cfg.loss) and is_main():
            print(f"crappify: warning: loss {_loss_name(cfg.loss)} runs on a VGG with random weights "
                  "(--no-pretrained), which measures nothing perceptual; use l1/mse or give the VGG weights",
                  file=sys.stderr, flush=True)
        total = sum(p.epochs for p in phases)
        loss = build_loss(cfg.loss, pretrained=cfg.pretrained, weights=cfg.loss_weight_files)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        start = 0
        self.key = config_key(cfg, RUN_KEYS)
        last = self.run / "checkpoints" / "last.pt"
        state = resume_state(last, self.key, self.resume, "train-gen", move=is_main(),
                             required=("model", "epoch", "history"))
        if state is not None:
            restore(model, state["model"], last)
            start, self.history = int(state["epoch"]), list(state["history"])
        if cfg.log == "tensorboard" and is_main():  # its steps go on from the checkpoint's
            from srgan.callbacks import TensorBoardLog

            self.board = TensorBoardLog(self.run / "tensorboard", int(state.get("steps") or 0) if state else 0)
        if cfg.ema:  # an eager copy, built from the spec (before --compile wraps the model)
            from srgan.generators import clone_generator

            self.ema = clone_generator(model).eval().requires_grad_(False)
            if state is not None and state.get("ema") is not None:
                restore(self.ema, state["ema"], last, "EMA")
        # --compile: the training step's forward passes, model and loss (its VGG included), in place (the files
        # stay those of an uncompiled run); validation and previews, without autograd, run eagerly. No graph
        # breaks in any generator or loss (torch._dynamo.explain; tests/srgan/test_compile.py).
        model = compile_module(model, cfg.compile, self.device, grad_only=True)
        loss = compile_module(loss, cfg.compile, self.device, grad_only=True)
        if is_main():  # history.csv follows the checkpoint: rows past it (a kill between the two) are dropped
            self.write_history()
        learn = None  # stays None when the checkpoint is at the end: the stage only writes its final file
        done = 0
        for phase in phases:
            if done + phase.epochs <= start:
                done += phase.epochs
                continue
            dls = self._dataloaders(phase, unet)
            if learn is None:
                learn = self._learner(model, loss.to(self.device), dls)
                learn.model.to(self.device)
                learn.create_opt()
                # every rank seeds its epoch's crops; only rank 0 writes history, previews and checkpoints
                learn.add_cb(_epoch_end_callback(self, write=is_main(), state=state))
                if self.board is not None:  # a U-Net's parameter groups: encoder, decoder (discriminative rates)
                    from srgan.callbacks import TensorBoardLosses

                    learn.add_cb(TensorBoardLosses(self.board, ("encoder", "decoder") if unet else ()))
                if self.ema is not None:
                    from srgan.callbacks import WeightEMA

                    learn.add_cb(WeightEMA(self.ema.to(self.device), cfg.ema_decay))
            else:
                learn.dls = dls
            learn.freeze() if phase.frozen else learn.unfreeze()  # fastai clears the optimiser state here
            if state is not None and "opt" in state:  # so the checkpoint's state goes in after it, once
                load_optimizer_state(learn.opt, state.pop("opt"), last)
            lr = (phase.lr if phase.frozen or not (unet and cfg.encoder_pretrained())
                  else slice(phase.lr / 100, phase.lr))
            learn.crappify_phase = phase
            learn.crappify_offset = done
            learn.fit_one_cycle(phase.epochs, lr, pct_start=cfg.pct_start, moms=one_cycle_moms(cfg.betas),
                                start_epoch=max(0, start - done))
            done += phase.epochs
        final = self.run / "generator.safetensors"
        if is_distributed():
            print(f"rank {rank()}/{world_size()}: trained {self.batches} batches", file=sys.stderr, flush=True)
        if is_main():
            last = self.history[-1] if self.history else {}
            below = bool(last.get("below_bicubic"))
            save_generator(learn.model if learn is not None else model, final, data_scale=self.data_scale,
                           extra={"stage": "train-gen", "epochs": total, "dataset": str(Path(cfg.data).resolve()),
                                  "loss": cfg.loss, "valid_psnr": last.get("psnr"),
                                  "valid_bicubic_psnr": last.get("bicubic_psnr"), "below_bicubic": below})
            if self.ema is not None:
                save_generator(self.ema, self.run / "generator-ema.safetensors", data_scale=self.data_scale,
                               extra={"stage": "train-gen", "epochs": total, "dataset": str(Path(cfg.data).resolve()),
                                      "loss": cfg.loss, "ema_decay": cfg.ema_decay})
            if below:
                print(f"crappify: warning: {final} scores below bicubic on the validation crops "
                      f"(PSNR {last.get('psnr')} vs {last.get('bicubic_psnr')} dB): it makes photos worse; "
                      "train longer or check the data", file=sys.stderr, flush=True)
        finish()  # under torchrun: the other ranks wait for the file, then all leave the process group
        return final

    # -- per-epoch outputs -----------------------------------------------------------------------------
    def previews(self, learn, epoch: int) -> None:
        n = self.cfg.preview_items
        ds = learn.dls.valid.dataset
        if not n or not len(ds):
            return
        items = [ds[i] for i in range(min(n, len(ds)))]
        lr = torch.stack([x for x, _ in items]).to(self.device)
        hr = torch.stack([y for _, y in items])
        model = unwrap(learn.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(self.normalizer.normalize(lr).contiguous(
                memory_format=torch.channels_last if self.cfg.channels_last else torch.contiguous_format))
        model.train(was_training)
        out8 = self.normalizer.to_uint8(out.float()).cpu()
        tiles = []
        for i in range(len(items)):
            for label, t in (("LR", lr[i].cpu()), (f"epoch {epoch}", out8[i]), ("HR", hr[i])):
                tiles.append((label, t.permute(1, 2, 0).numpy()))
        path = self.run / "previews" / f"epoch_{epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = grid(tiles, height=max(64, min(256, hr.shape[-2])), columns=3)
        save_image_atomic(path, image)
        if self.board is not None:
            self.board.image("preview", image)

    def validate_hr(self, learn) -> dict[str, float | str]:
        """This epoch's generator on the whole images of `val_hr` (BasicSR's PSNR/SSIM-Y): the history's val_*."""
        from srgan.callbacks import history_value
        from srgan.evaluate import score
        from srgan.inference import TiledInference

        model = unwrap(learn.model)
        was_training = model.training
        try:
            engine = TiledInference(model, device=self.device, normalizer=self.normalizer, data_scale=self.data_scale,
                                    channels_last=self.cfg.channels_last)
            means = score(engine, self.val_set)
        finally:
            model.train(was_training)
        return {f"val_{k}": history_value(v) for k, v in means.items()}

    def keep_best(self, learn, epoch: int) -> None:
        """RUN/generator-best.safetensors from this epoch's generator when its `keep_best` value beats every earlier
        epoch's in the history (which the checkpoint carries, so a resumed run keeps comparing with the same)."""
        metric = self.cfg.keep_best
        if metric is None or not self.history:
            return
        value = self.history[-1].get(metric)
        earlier = [r.get(metric) for r in self.history[:-1]]
        earlier = [v for v in earlier if isinstance(v, float) and math.isfinite(v)]
        if not (isinstance(value, float) and math.isfinite(value)) or (earlier and value <= max(earlier)):
            return
        save_generator(unwrap(learn.model), self.run / "generator-best.safetensors", data_scale=self.data_scale,
                       extra={"stage": "train-gen", "epoch": epoch, "best": metric, metric: value,
                              "dataset": str(Path(self.cfg.data).resolve()), "loss": self.cfg.loss})

    def write_history(self) -> None:
        columns = HISTORY_COLUMNS + (VAL_COLUMNS if self.cfg.val_hr is not None else [])
        write_csv_atomic(self.run / "history.csv", columns, self.history)


def _lr_find_plot(lrs: list[float], losses: list[float], suggestions: dict[str, float]) -> bytes:
    """`lr_find`'s plot as PNG bytes: the smoothed loss against the learning rate (log scale; the last 5 points left
    out when there are more than 10, as fastai's own plot does), each suggestion a vertical line. Drawn on a bare
    matplotlib Figure (Agg, no pyplot), so no display or global backend is involved."""
    import io

    from matplotlib.figure import Figure

    n = len(lrs) - 5 if len(lrs) > 10 else len(lrs)
    fig = Figure(figsize=(6, 4), dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.plot(lrs[:n], losses[:n])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    for (name, lr), color in zip(suggestions.items(), ("tab:red", "tab:green", "tab:orange"), strict=False):
        ax.axvline(lr, color=color, linestyle="--", label=f"{name}: {lr:.2e}")
    if suggestions:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _epoch_end_callback(trainer: Trainer, write: bool = True, state: dict[str, Any] | None = None):
    """train-gen's `srgan.callbacks.EpochEnd` (fastai imported on use): a history row per epoch and a preview grid,
    epochs numbered across the schedule's phases; `state` is the checkpoint the run resumed from, if any."""
    from srgan.callbacks import EpochEnd, history_value

    class GenEpochEnd(EpochEnd):
        def global_epoch(self) -> int:
            return self.learn.crappify_offset + self.epoch

        def row(self, epoch: int, values: dict[str, Any]) -> dict[str, Any]:
            phase = self.learn.crappify_phase
            psnr, base = history_value(values.get("psnr")), history_value(values.get("bicubic_psnr"))
            below = isinstance(psnr, float) and isinstance(base, float) and psnr < base
            if below:
                print(f"epoch {epoch}: validation PSNR {psnr:.2f} dB is BELOW bicubic's {base:.2f} dB",
                      file=sys.stderr, flush=True)
            return {"epoch": epoch, "stage": phase.stage, "phase": "frozen" if phase.frozen else "unfrozen",
                    "size": phase.size, "bs": phase.bs, "train_loss": history_value(self._loss.mean),
                    "valid_loss": history_value(values.get("valid_loss")), "psnr": psnr, "bicubic_psnr": base,
                    "ssim": history_value(values.get("ssim")), "below_bicubic": below,
                    "seconds": round(time.perf_counter() - self._t0, 3), "data_wait": self.data_wait(),
                    **(trainer.validate_hr(self.learn) if trainer.val_set is not None else {})}

        def outputs(self, epoch: int) -> None:
            trainer.previews(self.learn, epoch)
            trainer.keep_best(self.learn, epoch)

        def checkpoint(self, position: dict[str, Any]) -> None:  # the EMA copy resumes with the model
            ema = {"ema": trainer.ema.state_dict()} if trainer.ema is not None else {}
            super().checkpoint({**position, **ema})

    return GenEpochEnd("train-gen", trainer.run / "checkpoints" / "last.pt", trainer.cfg.checkpoint_every,
                       trainer.stop, write, state, history=trainer.history, key=trainer.key,
                       save_checkpoint=save_checkpoint, write_history=trainer.write_history,
                       board=trainer.board)

