"""`train-gan`: a short alternating generator/critic phase after pretraining ("NoGAN", DeOldify style).

Built on fastai's GAN machinery: `GANLearner.from_learners(generator learner, critic learner)` wires the
`GANModule`, `GANTrainer` and a switcher (`AdaptiveGANSwitcher(critic_thresh=0.65)`, the course default, or
`FixedGANSwitcher(n_crit, n_gen)`), with `GANDiscriminativeLR` giving the critic × 5 the learning rate and fastai's
Adam for both networks (`betas`, `eps`, `wd`; by default the course's betas (0, 0.99)); `per-batch` switching (one
generator step, then one critic step, on every batch) is ours. What fastai lacks or gets wrong for this use is
added in `srgan.gan_loop`, each class saying what it fixes: the loss (content × w_content + adversarial × w_adv
with four adversarial losses, including the WGAN gradient penalty), EMA of the generator's weights, resumable
switcher state, skipping validation, keeping the non-trained network's weights truly fixed, and the per-step
history/checkpoints/previews.

The phase runs `iters` steps (or `epochs` × the batches of an epoch; one step trains one of the two networks,
or both with `per-batch`).
Every `checkpoint_every` steps: `RUN/gan/checkpoints/generator_NNNNNN.safetensors` (+ `generator-ema_…` with
EMA), a fixed-crop preview grid `RUN/gan/previews/step_NNNNNN.png`, and the resumable state
`RUN/gan/checkpoints/last.pt` (generator, critic, the optimiser state of both, switcher, EMA, step); SIGTERM
writes them at the next step boundary and stops (`Interrupted`). Every step appends a row to
`RUN/gan/history.csv`. The result is `RUN/gan/generator.safetensors` (and
`generator-ema.safetensors`), in the self-describing format `srgan.checkpoint.load_generator` reads.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import save_image_atomic, write_atomic, write_csv_atomic
from srgan.adversarial import AdversarialName
from srgan.checkpoint import (
    config_key,
    file_digest,
    load_optimizer_state,
    restore,
    resume_state,
    save_checkpoint,
    save_generator,
)
from srgan.losses import LossSpec
from srgan.runtime import (
    MAX_BATCH,
    MAX_CROP,
    MAX_PREVIEW,
    AdamOptions,
    Beta,
    RunOptions,
    StopRequest,
    compile_module,
    resolve_device,
    resolve_precision,
    sigterm_stops,
)

# (w_content, w_adv): the course's GANLearner(weights_gen=(1., 50.)) puts 1 on the adversarial term and 50 on
# the content loss; the SRGAN paper adds 1e-3 × adversarial to its content loss.
WEIGHTINGS: dict[str, tuple[float, float]] = {"course": (50.0, 1.0), "srgan": (1.0, 1e-3)}
# how to run and how long, not what is trained (see srgan.train_gen.RUN_KEYS)
RUN_KEYS = frozenset({"device", "precision", "channels_last", "num_workers", "iters", "epochs", "checkpoint_every",
                      "preview_items", "compile", "log"})
HISTORY_COLUMNS = ["step", "epoch", "trained", "loss", "gen_loss", "crit_loss", "content_loss", "adv_loss", "lr",
                   "gen_steps", "crit_steps", "to_gen", "to_crit", "seconds", "data_seconds"]


class TrainGanConfig(RunOptions, AdamOptions):
    """Options of `crappify train-gan` (also the keys of its `--config` YAML file)."""

    data: str
    out: str
    generator: str | None = Field(None, description="start generator; default RUN/generator.safetensors; also a "
                                  "BasicSR / Real-ESRGAN .pth or .safetensors of an rrdb or compact model")
    critic: str | None = Field(None, description="start critic; default RUN/critic.safetensors")
    generator_arch: str | None = Field(None, description="start from a new generator of this arch (random "
                                                         "weights) instead of a file: a joint GAN from scratch")
    generator_options: dict[str, Any] = Field(default_factory=dict, description="its options (n_blocks, ...)")
    critic_arch: str | None = Field(None, description="start from a new critic of this arch instead of a file")
    critic_options: dict[str, Any] = Field(default_factory=dict, description="its options (nf, ...)")
    loss: LossSpec = Field(
        None, description="content loss; default: the generator's own; {name: weight} or {name: {weight: w, ...}}")
    pretrained: bool = True
    loss_weight_files: dict[str, str] | None = Field(
        None, description="local weight files for the loss networks, keyed by loss (feature), network "
                          "(vgg16_bn) or torchvision weights name; default: torchvision's cache")
    adv_loss: AdversarialName = "bce"
    gp_weight: float = Field(10.0, ge=0)
    weighting: Literal["course", "srgan"] = "course"
    w_content: float | None = Field(None, ge=0, description="overrides the weighting preset")
    w_adv: float | None = Field(None, ge=0, description="overrides the weighting preset")
    switching: Literal["adaptive", "fixed", "per-batch"] = Field(
        "adaptive", description="adaptive (the course's, on the critic's loss), fixed (n_crit critic steps, then "
                                "n_gen generator steps; each step one batch), or per-batch (on every batch one "
                                "generator step, then one critic step on the same batch and the same fakes)")
    critic_thresh: float = 0.65
    gen_thresh: float | None = None
    n_crit: int = Field(1, ge=1)
    n_gen: int = Field(1, ge=1)
    gen_first: bool = False
    lr: float = Field(1e-4, gt=0)
    critic_lr_mult: float = Field(5.0, gt=0)
    betas: tuple[Beta, Beta] = Field((0.0, 0.99), description="Adam's (beta1, beta2) for both networks; default "
                                                                "the fastai course's (no momentum)")
    size: int = Field(128, ge=8, le=MAX_CROP)
    bs: int = Field(8, ge=1, le=MAX_BATCH)
    iters: int | None = Field(None, ge=1, description="GAN steps; default: `epochs` × batches per epoch")
    epochs: float = Field(0.03, gt=0, description="length in epochs when iters is not given (a fraction is fine)")
    checkpoint_every: int = Field(100, ge=1)
    preview_items: int = Field(4, ge=0, le=MAX_PREVIEW)
    ema: bool = False
    ema_decay: float = Field(0.999, gt=0, lt=1)
    degrade: Literal["offline", "online"] = Field(
        "offline", description="offline: the dataset's LR files; online: degrade each HR crop in the data loader "
                               "anew every epoch (Real-ESRGAN), seeded by (seed, epoch, item)")
    degrade_preset: str | None = Field(None, description="degrade: online only: a preset name or YAML file; "
                                                         "default: the dataset's own")
    sharpen_gt: bool = Field(False, description="train towards USM-sharpened HR crops (Real-ESRGAN; online, "
                                                "degraded from the sharpened crop, as there)")



    def content_adv_weights(self) -> tuple[float, float]:
        """(w_content, w_adv): the preset's, with explicit values taking precedence."""
        w_content, w_adv = WEIGHTINGS[self.weighting]
        return (w_content if self.w_content is None else self.w_content,
                w_adv if self.w_adv is None else self.w_adv)


class GanRun:
    """State of one GAN phase shared by its callbacks: counters, EMA copy, history, output paths."""

    def __init__(self, cfg: TrainGanConfig, total: int, normalizer: Any) -> None:
        self.cfg, self.total, self.normalizer = cfg, total, normalizer
        self.dir = Path(cfg.out) / "gan"
        self.step = 0
        self.counts = {"gen_steps": 0, "crit_steps": 0, "to_gen": 0, "to_crit": 0}
        self.switcher_state: dict[str, int] = {}
        self.gen_mode: bool | None = None
        self.ema: torch.nn.Module | None = None
        self.rows: list[dict[str, Any]] = []  # one per step; written out with each checkpoint
        self.key = ""
        self.data_scale = 1  # the dataset's HR/LR ratio, recorded in every generator file (set by _train_gan)
        self.content_loss: Any = None  # the content loss in use, recorded beside it
        self.saved_step: int | None = None  # the step of the checkpoint on disk (None: none of this run's yet)
        self.stop: StopRequest | None = None  # set by SIGTERM
        self.board: Any = None  # RUN/gan/tensorboard/'s writer (srgan.callbacks.TensorBoardLog), with log tensorboard

    @property
    def last(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"

    def write_history(self) -> None:
        """history.csv from the rows so far, atomically. Called after each checkpoint (whose state carries the
        same rows), so the file is never ahead of the checkpoint; a resume rewrites it from the checkpoint."""
        write_csv_atomic(self.dir / "history.csv", HISTORY_COLUMNS, self.rows)


def train_gan(cfg: TrainGanConfig, resume: bool = False, progress: bool = True, cbs: list | None = None) -> Path:
    """Run the GAN phase of RUN (see the module docstring); returns RUN/gan/generator.safetensors.

    `resume` continues from RUN/gan/checkpoints/last.pt when it belongs to this config and these start files;
    a checkpoint at the last step only writes the final files. SIGTERM: the state at the next step boundary,
    then `Interrupted`. `cbs`: extra fastai callbacks (tests use them to watch each step).
    """
    from srgan.distributed import finish, run_folder

    with run_folder(cfg.out, "train-gan run", ("gan", "gan/checkpoints")), sigterm_stops("train-gan") as stop:
        final = _train_gan(cfg, resume, progress, cbs, stop)
    finish()  # under torchrun: the other ranks wait for rank 0's files, then all leave the process group
    return final


def _train_gan(cfg: TrainGanConfig, resume: bool, progress: bool, cbs: list | None,
               stop: StopRequest | None = None) -> Path:
    from fastai.learner import Learner
    from fastai.torch_core import params
    from fastai.vision.gan import AdaptiveGANSwitcher, GANDiscriminativeLR, GANLearner

    from srgan import gan_loop as loop
    from srgan.adversarial import build_adversarial
    from srgan.basicsr import is_crappify_file, load_start_generator
    from srgan.callbacks import DeviceMixedPrecision, adam, quiet
    from srgan.checkpoint import load_critic, read_critic_meta, read_generator_meta
    from srgan.critics import min_input_size
    from srgan.data import data_scale, make_dataloaders, read_dataset
    from srgan.distributed import broadcast_tensors, is_main, join, joined, local_device
    from srgan.generators import clone_generator, is_unet
    from srgan.losses import build_loss
    from srgan.normalize import Normalizer
    from srgan.train_critic import patch_bce

    run = Path(cfg.out)
    device = local_device(resolve_device(cfg.device))  # under torchrun: each rank its own GPU
    join(device)
    precision = resolve_precision(cfg.precision, device)
    gen_path = Path(cfg.generator) if cfg.generator else run / "generator.safetensors"
    crit_path = Path(cfg.critic) if cfg.critic else run / "critic.safetensors"
    if (cfg.generator_arch and cfg.generator) or (cfg.critic_arch and cfg.critic):
        raise ConfigError("give a start file (generator/critic) or an arch to build a new one, not both")
    # a released model (BasicSR / Real-ESRGAN / OpenModelDB layout) starts a GAN as a file of ours does
    foreign = not cfg.generator_arch and gen_path.is_file() and not is_crappify_file(gen_path)
    gen_meta = {"extra": {}} if cfg.generator_arch or foreign else read_generator_meta(gen_path)
    crit_spec = ({"arch": cfg.critic_arch, "options": cfg.critic_options} if cfg.critic_arch
                 else read_critic_meta(crit_path)["spec"])
    if cfg.size < min_input_size(crit_spec["arch"], **crit_spec["options"]):
        raise ConfigError(f"size {cfg.size} is too small for the critic {crit_spec['arch']!r} "
                          f"(at least {min_input_size(crit_spec['arch'], **crit_spec['options'])} px)")
    key = (config_key(cfg, RUN_KEYS) + ("new" if cfg.generator_arch else file_digest(gen_path))
           + ("new" if cfg.critic_arch else file_digest(crit_path)))
    last = run / "gan" / "checkpoints" / "last.pt"
    state = resume_state(last, key, resume, "train-gan", move=is_main(),
                         required=("generator", "critic", "step", "counts", "gen_mode", "switcher", "history"))
    torch.manual_seed(cfg.seed)  # new networks' weights, dropout in the critic (data order and ε: seeded apart)
    generator = (_new_generator(cfg) if cfg.generator_arch else load_start_generator(gen_path, device)).to(device)
    generator.train()
    critic = (_new_critic(cfg) if cfg.critic_arch else load_critic(crit_path, device)).to(device).train()
    if state is not None:
        restore(generator, state["generator"], last, "generator")
        restore(critic, state["critic"], last, "critic")
    # data-parallel: every rank starts from rank 0's weights (the same files or seed give the same already)
    broadcast_tensors([*generator.state_dict().values(), *critic.state_dict().values()])
    default_loss = "l1" if cfg.generator_arch or foreign else "feature"  # no train-gen loss to reuse
    content_spec = cfg.loss or gen_meta["extra"].get("loss") or default_loss
    content = build_loss(content_spec, pretrained=cfg.pretrained,
                         weights=cfg.loss_weight_files).to(device)
    adversarial = build_adversarial(cfg.adv_loss, cfg.gp_weight)
    w_content, w_adv = cfg.content_adv_weights()
    normalizer = Normalizer()
    spec = generator.crappify_spec
    dls = make_dataloaders(cfg.data, cfg.size, cfg.bs, resize_lr=is_unet(generator), scale=spec["scale"],
                           device=device, num_workers=cfg.num_workers, seed=cfg.seed,
                           channels_last=cfg.channels_last, normalizer=normalizer, degrade=cfg.degrade,
                           degrade_preset=cfg.degrade_preset, sharpen_gt=cfg.sharpen_gt)
    if joined():  # each rank its share of every pass over the training crops (the order broadcast from rank 0)
        from srgan.distributed import any_backend_dl

        dls.loaders[0] = any_backend_dl(dls.train, device=device)
    n_batches = len(dls.train)
    total = cfg.iters or max(1, math.ceil(cfg.epochs * n_batches))
    gan = GanRun(cfg, total, normalizer)
    gan.key, gan.stop = key, stop
    gan.data_scale = data_scale(read_dataset(cfg.data)[1])
    gan.content_loss = content_spec
    if state is not None:
        gan.step, gan.counts = int(state["step"]), dict(state["counts"])
        gan.saved_step = gan.step
        gan.gen_mode, gan.switcher_state = bool(state["gen_mode"]), dict(state["switcher"])
        gan.rows = list(state["history"])
    if cfg.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        critic = critic.to(memory_format=torch.channels_last)
    # --compile: the training steps' forward passes (generator, critic, content loss) in place, so the files stay
    # those of an uncompiled run; calls without autograd (the critic step's fakes, previews) run eagerly, and so
    # does the gradient penalty (its double backward is not supported compiled: `gan_loop.penalty`). The critic
    # compiles once per state as it is frozen and unfrozen. The EMA copy is rebuilt from the spec: eager.
    generator = compile_module(generator, cfg.compile, device, grad_only=True)
    critic = compile_module(critic, cfg.compile, device, grad_only=True)
    content = compile_module(content, cfg.compile, device, grad_only=True)
    if cfg.ema:
        gan.ema = clone_generator(generator).eval().requires_grad_(False)
        if state is not None and state.get("ema") is not None:
            restore(gan.ema, state["ema"], last, "EMA")
    if is_main():
        gan.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "train-gan.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        gan.write_history()  # in step with the checkpoint: rows past it (a kill between the two) are dropped
    if gan.step >= total:  # the checkpoint is at the end: only the final files are missing
        return _save_final(cfg, gan, generator)
    if cfg.log == "tensorboard" and is_main():  # its steps go on from the checkpoint's
        from srgan.callbacks import TensorBoardLog

        gan.board = TensorBoardLog(gan.dir / "tensorboard", gan.step)

    per_batch = cfg.switching == "per-batch"
    if per_batch:  # fastai's switchers give each batch to one network: the critic's step is ours (PerBatchCritic)
        switcher = loop.PerBatchCritic(cfg.critic_lr_mult, gan)
    elif cfg.switching == "adaptive":
        switcher = AdaptiveGANSwitcher(gen_thresh=cfg.gen_thresh, critic_thresh=cfg.critic_thresh)
    else:
        switcher = loop.ResumableFixedSwitcher(cfg.n_crit, cfg.n_gen)
    # Callbacks passed here sit before GANTrainer and the switcher among equal `order`s: GANDiscriminativeLR's
    # after_batch must divide the rate back before the switcher leaves critic mode, or the × 5 would stick.
    cbs = [GANDiscriminativeLR(mult_lr=cfg.critic_lr_mult), loop.Guard(), loop.StopOnNonFinite(gan),
           loop.Progress(gan, save_state), *([loop.SyncRanks()] if joined() else []),
           *([loop.TensorBoardTerms(gan)] if gan.board is not None else []), *(cbs or [])]
    if precision in ("bf16", "fp16"):
        cbs.append(DeviceMixedPrecision(amp_mode=precision))
    gen_learn = Learner(dls, generator, loss_func=content)
    crit_learn = Learner(dls, critic, loss_func=patch_bce)
    learn = GANLearner.from_learners(
        gen_learn, crit_learn, switcher=switcher, weights_gen=(w_adv, w_content),
        gen_first=cfg.gen_first or per_batch,
        show_img=False, opt_func=adam(cfg.betas, cfg.eps, cfg.wd), wd=cfg.wd,
        splitter=lambda m: [params(m.generator), params(m.critic)], cbs=cbs, path=gan.dir, model_dir="checkpoints")
    # from_learners' loss (fastai's gan_loss_from_func) only knows `loss(pred, labels)`, which cannot express
    # hinge's or WGAN's generator term nor a gradient penalty on images: the GANLoss is replaced by our subclass.
    learn.loss_func = loop.CrappifyGANLoss(content, adversarial, w_content, w_adv, learn.model, seed=cfg.seed)
    if state is not None and state.get("penalty_rng") is not None:  # the gradient penalty's ε go on, not restart
        learn.loss_func.rng.set_state(state["penalty_rng"])
    learn.recorder.valid_metrics = False
    if not progress or not is_main():
        quiet(learn)
    learn.create_opt()
    if state is not None:
        load_optimizer_state(learn.opt, state["opt"], last)
    with warnings.catch_warnings():  # fastai's own GANTrainer attributes, and its CUDA-only autocast notice
        warnings.filterwarnings("ignore", message=r"You are shadowing an attribute")
        warnings.filterwarnings("ignore", message=r"CUDA is not available")
        try:
            learn.fit(math.ceil((total - gan.step) / n_batches) + 1, lr=cfg.lr)
        finally:  # whatever stopped the phase (a NaN loss, SIGTERM), its events so far are on disk
            if gan.board is not None:
                gan.board.close()
    if gan.step < total:  # fit ended early without an error (should not happen): leave no misleading result
        raise CrappifyError(f"the GAN phase stopped at step {gan.step} of {total}")
    return _save_final(cfg, gan, learn.model.generator)


def _new_generator(cfg: TrainGanConfig) -> torch.nn.Module:
    """A generator of `generator_arch` with random weights (an ImageNet encoder for U-Nets when `pretrained`),
    at the dataset's scale (U-Nets: 1, their input is resized)."""
    from srgan.data import data_scale, read_dataset
    from srgan.generators import NO_IMAGENET_WEIGHTS, build_generator, is_unet_arch

    arch = cfg.generator_arch
    assert arch is not None
    scale = 1 if is_unet_arch(arch) else data_scale(read_dataset(cfg.data)[1])
    return build_generator(arch, scale=scale, img_size=cfg.size,
                           pretrained=cfg.pretrained and arch not in NO_IMAGENET_WEIGHTS, **cfg.generator_options)


def _new_critic(cfg: TrainGanConfig) -> torch.nn.Module:
    from srgan.critics import build_critic

    assert cfg.critic_arch is not None
    return build_critic(cfg.critic_arch, **cfg.critic_options)


def _save_final(cfg: TrainGanConfig, gan: GanRun, generator: torch.nn.Module) -> Path:
    """RUN/gan/generator.safetensors (and the EMA's), from the generator at the last step (rank 0 writes)."""
    from srgan.distributed import is_main

    final = gan.dir / "generator.safetensors"
    if not is_main():
        return final
    extra = file_extra(gan)
    save_generator(generator, final, data_scale=gan.data_scale, extra=extra)
    if gan.ema is not None:
        save_generator(gan.ema, gan.dir / "generator-ema.safetensors", data_scale=gan.data_scale,
                       extra={**extra, "ema_decay": cfg.ema_decay})
    return final


def file_extra(gan: GanRun) -> dict[str, Any]:
    """What the GAN phase records in each generator file it writes (final, EMA and checkpoints alike)."""
    return {"stage": "train-gan", "gan_steps": gan.step, "dataset": str(Path(gan.cfg.data).resolve()),
            "loss": gan.content_loss, "adv_loss": gan.cfg.adv_loss}


def save_state(learn: Any, gan: GanRun) -> None:
    """Generator file(s), preview and resumable state at the current step (the state last, so it is never
    ahead of the files it names). Rank 0 writes; every rank notes the step."""
    from srgan.distributed import is_main

    step = gan.step
    if not is_main():
        gan.saved_step = step
        return
    ckpt = gan.dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    generator = learn.model.generator
    extra = file_extra(gan)
    save_generator(generator, ckpt / f"generator_{step:06d}.safetensors", data_scale=gan.data_scale, extra=extra)
    if gan.ema is not None:
        save_generator(gan.ema, ckpt / f"generator-ema_{step:06d}.safetensors", data_scale=gan.data_scale,
                       extra={**extra, "ema_decay": gan.cfg.ema_decay})
    preview(learn, gan)
    switcher = next((cb for cb in learn.cbs if hasattr(cb, "n_c")), None)
    save_checkpoint(gan.last, {
        "generator": generator.state_dict(), "critic": learn.model.critic.state_dict(),
        "opt": learn.opt.state_dict(), "step": step, "gen_mode": bool(learn.gan_trainer.gen_mode),
        "switcher": {"n_c": switcher.n_c, "n_g": switcher.n_g} if switcher is not None else {},
        "counts": gan.counts, "ema": gan.ema.state_dict() if gan.ema is not None else None,
        "history": gan.rows, "config_key": gan.key, "penalty_rng": learn.loss_func.rng.get_state()})
    gan.saved_step = step
    gan.write_history()


@torch.no_grad()
def preview(learn: Any, gan: GanRun) -> None:
    """LR | generator (| EMA) | HR on the first validation items' centre crops: the same crops every time."""
    from crappify.preview import grid

    n = gan.cfg.preview_items
    ds = learn.dls.valid.dataset
    if not n or not len(ds):
        return
    items = [ds[i] for i in range(min(n, len(ds)))]
    lr = torch.stack([x for x, _ in items])
    hr = torch.stack([y for _, y in items])
    fmt = torch.channels_last if gan.cfg.channels_last else torch.contiguous_format
    x = gan.normalizer.normalize(lr.to(learn.dls.device)).contiguous(memory_format=fmt)
    models = [(f"step {gan.step}", learn.model.generator)] + ([("EMA", gan.ema)] if gan.ema is not None else [])
    outs = []
    for label, model in models:
        was_training = model.training
        model.eval()
        outs.append((label, gan.normalizer.to_uint8(model(x).float()).cpu()))
        model.train(was_training)
    tiles = []
    for i in range(len(items)):
        tiles.append(("LR", lr[i].permute(1, 2, 0).numpy()))
        tiles += [(label, out[i].permute(1, 2, 0).numpy()) for label, out in outs]
        tiles.append(("HR", hr[i].permute(1, 2, 0).numpy()))
    path = gan.dir / "previews" / f"step_{gan.step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid(tiles, height=max(64, min(256, hr.shape[-2])), columns=len(models) + 2)
    save_image_atomic(path, image)
    if gan.board is not None:
        gan.board.image("preview", image, gan.step)
