"""Training commands: `train-gen` (generator pretraining), `train-critic` (critic pretraining) and `train-gan`.

torch, fastai and `srgan` are imported inside the commands, so `crappify --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from crappify.cli.options import (
    ADV_LOSSES,
    CRITIC_ARCHS,
    SWITCHINGS,
    WEIGHTINGS,
    BatchSize,
    compile_option,
    config_option,
    degrade_options,
    device_option,
    gradient_options,
    log_option,
    offline_option,
    quiet_option,
    stage_precision_option,
    workers_option,
)

_CRITICS = ", ".join(f"{name} (default, fastai's)" if name == "gan-critic" else name for name in CRITIC_ARCHS)


@click.command("train-gen")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory (shared by later stages).")
@config_option
@click.option("--arch", help="Generator: unet-resnet34 (default), unet-resnet18/50/101/152, unet-small, "
                             "unet-timm:NAME, srresnet, rrdb.")
@click.option("--loss", help="Loss: feature (default), l1, mse, vgg19, tv; combine in --config as {name: weight}.")
@click.option("--size", type=int, help="HR crop size in px (default 128).")
@click.option("--bs", type=BatchSize(), help="Batch size per process (default: 8; on CUDA the fastai course's, 32 at "
                                         "128 px, 12 at 256 px), or auto: the largest that fits the GPU.")
@click.option("--epochs", type=int, help="Epochs per phase (default 1); a pretrained U-Net runs frozen then unfrozen.")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default 1e-3).")
@click.option("--no-pretrained", "no_pretrained", is_flag=True, default=None,
              help="Random encoder and loss-network weights (no ImageNet weights needed).")
@click.option("--weights", help="Local file with the encoder's ImageNet weights.")
@click.option("--init", help="Start from a trained generator: a crappify generator file, or a BasicSR / Real-ESRGAN / "
                             "OpenModelDB .pth or .safetensors of an RRDBNet or compact model (its arch is the run's).")
@device_option()
@stage_precision_option()
@workers_option
@compile_option
@log_option
@click.option("--seed", type=int, help="Seed for weights init and data order (default 0).")
@click.option("--checkpoint-every", type=int,
              help="Also checkpoint every N batches of an epoch (default: at epoch ends only).")
@click.option("--ema/--no-ema", default=None,
              help="Also keep an EMA of the weights (decay 0.999): RUN/generator-ema.safetensors.")
@gradient_options
@degrade_options
@click.option("--val-hr", help="Also validate every epoch on a benchmark folder of HR images (Set5/GTmod12), whole "
                               "images scored as `evaluate --hr` does: val_psnr_y, val_ssim_y in history.csv.")
@click.option("--val-lr", help="--val-hr's LR images, matched by name (default: made by bicubic at the data's scale).")
@click.option("--keep-best", type=click.Choice(["psnr", "ssim", "val_psnr_y", "val_ssim_y"]),
              help="Also keep the epoch with the best value of this history column: RUN/generator-best.safetensors.")
@click.option("--lr-find", "lr_find", is_flag=True,
              help="Train nothing: run fastai's lr_find on the first phase as configured, print its suggested "
                   "learning rates and write RUN/lr_find.png and RUN/lr_find.json.")
@click.option("--lr-find-steps", "lr_find_steps", type=click.IntRange(6, 10_000), default=100, show_default=True,
              help="Batches --lr-find sweeps at most (fastai's num_it).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--save-preds", is_flag=True, help="Then write the generator's outputs to RUN/preds/<split>/.")
@offline_option
@quiet_option
def train_gen_cmd(data: str, out: str, config_file: str | None, no_pretrained: bool | None, resume: bool,
                  save_preds: bool, lr_find: bool, lr_find_steps: int, quiet: bool, **flags: Any) -> None:
    """Pretrain the generator on a built dataset DATA with a feature loss (fastai Learner)."""
    from crappify.config import resolve
    from srgan.distributed import is_main
    from srgan.train_gen import Trainer, TrainGenConfig

    cfg = resolve(TrainGenConfig, config_file, data=data, out=out,
                  pretrained=False if no_pretrained else None, **flags)
    if lr_find and (resume or save_preds):
        from crappify.errors import ConfigError

        raise ConfigError("--lr-find trains nothing: it goes without --resume and --save-preds")
    trainer = Trainer(cfg, resume=resume, progress=not quiet)
    if lr_find:
        found = trainer.lr_find(lr_find_steps)
        names = ", ".join(f"{k} {v:.2e}" for k, v in found["suggestions"].items())
        click.echo(f"lr_find ({found['phase']} phase, {found['steps']} batches): "
                   f"{'suggested lr: ' + names if names else 'no suggestion (the loss diverged at once)'}; "
                   f"plot {Path(cfg.out) / 'lr_find.png'}, values {Path(cfg.out) / 'lr_find.json'}")
        return
    final = trainer.fit()
    if not is_main():  # under torchrun, rank 0 alone writes the files and reports
        return
    click.echo(f"generator: {final}")
    if trainer.cfg.ema:
        click.echo(f"generator (EMA): {final.with_name('generator-ema.safetensors')}")
    best = final.with_name("generator-best.safetensors")
    if trainer.cfg.keep_best and best.is_file():
        click.echo(f"generator (best {trainer.cfg.keep_best}): {best}")
    if save_preds:
        from srgan.predict import save_preds as write_preds

        n = write_preds(cfg.out, cfg.data, trainer.device)
        click.echo(f"predictions: {n} written to {Path(cfg.out) / 'preds'}")


@click.command("train-critic")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator.safetensors (or preds/).")
@config_option
@click.option("--arch", help=f"Critic: {_CRITICS}.")
@click.option("--size", type=int, help="Crop size in px (default 128).")
@click.option("--bs", type=int, help="Batch size (default 8).")
@click.option("--epochs", type=int, help="Epochs (default 6, as in the course).")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default 1e-3).")
@device_option()
@stage_precision_option()
@workers_option
@compile_option
@log_option
@click.option("--seed", type=int, help="Seed for weights init and crops (default 0).")
@click.option("--checkpoint-every", type=int,
              help="Also checkpoint every N batches of an epoch (default: at epoch ends only).")
@gradient_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@offline_option
@quiet_option
def train_critic_cmd(data: str, out: str, config_file: str | None, resume: bool, quiet: bool, **flags: Any) -> None:
    """Pretrain a critic to tell DATA's real HR images from RUN's generator outputs (RUN/preds, made if missing)."""
    from crappify.config import resolve
    from srgan.distributed import is_main
    from srgan.train_critic import TrainCriticConfig, train_critic

    cfg = resolve(TrainCriticConfig, config_file, data=data, out=out, **flags)
    final = train_critic(cfg, resume=resume, progress=not quiet)
    if is_main():  # under torchrun, rank 0 alone writes the files and reports
        click.echo(f"critic: {final}")


@click.command("train-gan")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator and critic.safetensors.")
@config_option
@click.option("--generator", help="Start generator file (default RUN/generator.safetensors).")
@click.option("--critic", help="Start critic file (default RUN/critic.safetensors).")
@click.option("--generator-arch", help="Start from a new generator of this arch instead (joint GAN from scratch; "
                                       "its options as generator_options in --config).")
@click.option("--critic-arch", help=f"Start from a new critic of this arch instead ({', '.join(CRITIC_ARCHS)}; "
                                    "critic_options in --config).")
@click.option("--loss", help="Content loss (default: the generator's train-gen loss); {name: weight} in --config.")
@click.option("--adv-loss", type=click.Choice(ADV_LOSSES), help="Adversarial loss (default bce).")
@click.option("--weighting", type=click.Choice(WEIGHTINGS),
              help="course: content x50 + adversarial x1 (default); srgan: content + 1e-3 x adversarial.")
@click.option("--w-content", type=float, help="Content-loss weight (overrides --weighting).")
@click.option("--w-adv", type=float, help="Adversarial weight (overrides --weighting).")
@click.option("--switching", type=click.Choice(SWITCHINGS),
              help="adaptive: train the critic until its loss < --critic-thresh (default); fixed: --n-crit/--n-gen; "
                   "per-batch: a generator step, then a critic step on the same batch and fakes, every batch.")
@click.option("--critic-thresh", type=float, help="Adaptive switching threshold (default 0.65).")
@click.option("--n-crit", type=int, help="Fixed switching: critic steps per round (default 1).")
@click.option("--n-gen", type=int, help="Fixed switching: generator steps per round (default 1).")
@click.option("--lr", type=float, help="Generator learning rate (default 1e-4; the critic's is x5).")
@click.option("--size", type=int, help="HR crop size in px (default 128).")
@click.option("--bs", type=int, help="Batch size (default 8).")
@click.option("--iters", type=int, help="GAN steps (default: --epochs x batches per epoch).")
@click.option("--epochs", type=float, help="Length in epochs when --iters is not given (default 0.03).")
@click.option("--checkpoint-every", type=int, help="Generator checkpoint + preview every N steps (default 100).")
@click.option("--ema/--no-ema", default=None, help="Also keep an EMA of the generator's weights (decay 0.999).")
@degrade_options
@click.option("--no-pretrained", "no_pretrained", is_flag=True, default=None,
              help="Random loss-network weights (no ImageNet weights needed).")
@device_option()
@stage_precision_option()
@workers_option
@compile_option
@log_option
@click.option("--seed", type=int, help="Seed (default 0).")
@click.option("--resume", is_flag=True, help="Continue from RUN/gan/checkpoints/last.pt.")
@offline_option
@quiet_option
def train_gan_cmd(data: str, out: str, config_file: str | None, no_pretrained: bool | None, resume: bool,
                  quiet: bool, **flags: Any) -> None:
    """Short GAN phase on DATA: alternate generator and critic updates from RUN's pretrained pair."""
    from crappify.config import resolve
    from srgan.train_gan import TrainGanConfig, train_gan

    cfg = resolve(TrainGanConfig, config_file, data=data, out=out, pretrained=False if no_pretrained else None,
                  **flags)
    from srgan.distributed import is_main

    final = train_gan(cfg, resume=resume, progress=not quiet)
    if is_main():  # under torchrun rank 0 alone wrote the files
        click.echo(f"generator: {final}")
        if cfg.ema:
            click.echo(f"generator (EMA): {final.with_name('generator-ema.safetensors')}")


COMMANDS: list[click.Command] = [train_gen_cmd, train_critic_cmd, train_gan_cmd]
