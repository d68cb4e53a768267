"""`crappify train-critic` and `crappify train-gan`: critic pretraining and GAN training.

torch and fastai are imported inside the commands, so `crappify --help` stays fast.
"""

from __future__ import annotations

from typing import Any

import click

COMMANDS: list[click.Command] = []

_PRECISION = click.Choice(["auto", "fp32", "bf16", "fp16"])


def degrade_options(fn):
    """train-gen's and train-gan's data options: degradations made on the fly (Real-ESRGAN) and sharpened targets."""
    fn = click.option("--sharpen-gt/--no-sharpen-gt", default=None,
                      help="Train towards USM-sharpened HR crops (and degrade those online), as Real-ESRGAN.")(fn)
    fn = click.option("--degrade-preset", help="With --degrade online: a preset name or YAML file "
                                               "(default: the dataset's own).")(fn)
    return click.option("--degrade", type=click.Choice(["offline", "online"]),
                        help="offline (default): the dataset's LR files; online: degrade each HR crop in the "
                             "data loader, anew every epoch, seeded by (seed, epoch, item).")(fn)


@click.command("train-critic")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator.safetensors (or preds/).")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (flags override it).")
@click.option("--arch", help="Critic: gan-critic (default, fastai's), patch, srgan, unet-sn.")
@click.option("--size", type=int, help="Crop size in px (default 128).")
@click.option("--bs", type=int, help="Batch size (default 8).")
@click.option("--epochs", type=int, help="Epochs (default 6, as in the course).")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default 1e-3).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", type=_PRECISION, help="Mixed precision (default auto).")
@click.option("--workers", "num_workers", type=int, help="Data-loading processes (default: 8 on CUDA, 0 on CPU).")
@click.option("--seed", type=int, help="Seed for weights init and crops (default 0).")
@click.option("--checkpoint-every", type=int,
              help="Also checkpoint every N batches of an epoch (default: at epoch ends only).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_critic_cmd(data: str, out: str, config_file: str | None, resume: bool, quiet: bool, **flags: Any) -> None:
    """Pretrain a critic to tell DATA's real HR images from RUN's generator outputs (RUN/preds, made if missing)."""
    from crappify.config import resolve
    from srgan.critic import TrainCriticConfig, train_critic

    cfg = resolve(TrainCriticConfig, config_file, data=data, out=out, **flags)
    from srgan.distributed import is_main

    final = train_critic(cfg, resume=resume, progress=not quiet)
    if is_main():  # under torchrun, rank 0 alone writes the files and reports
        click.echo(f"critic: {final}")


@click.command("train-gan")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator and critic.safetensors.")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (flags override it).")
@click.option("--generator", help="Start generator file (default RUN/generator.safetensors).")
@click.option("--critic", help="Start critic file (default RUN/critic.safetensors).")
@click.option("--generator-arch", help="Start from a new generator of this arch instead (joint GAN from scratch; "
                                       "its options as generator_options in --config).")
@click.option("--critic-arch", help="Start from a new critic of this arch instead (critic_options in --config).")
@click.option("--loss", help="Content loss (default: the generator's train-gen loss); {name: weight} in --config.")
@click.option("--adv-loss", type=click.Choice(["bce", "lsgan", "hinge", "wgan-gp"]),
              help="Adversarial loss (default bce).")
@click.option("--weighting", type=click.Choice(["course", "srgan"]),
              help="course: content x50 + adversarial x1 (default); srgan: content + 1e-3 x adversarial.")
@click.option("--w-content", type=float, help="Content-loss weight (overrides --weighting).")
@click.option("--w-adv", type=float, help="Adversarial weight (overrides --weighting).")
@click.option("--switching", type=click.Choice(["adaptive", "fixed", "per-batch"]),
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
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", type=_PRECISION, help="Mixed precision (default auto).")
@click.option("--workers", "num_workers", type=int, help="Data-loading processes (default: 8 on CUDA, 0 on CPU).")
@click.option("--seed", type=int, help="Seed (default 0).")
@click.option("--resume", is_flag=True, help="Continue from RUN/gan/checkpoints/last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_gan_cmd(data: str, out: str, config_file: str | None, no_pretrained: bool | None, resume: bool,
                  quiet: bool, **flags: Any) -> None:
    """Short GAN phase on DATA: alternate generator and critic updates from RUN's pretrained pair."""
    from crappify.config import resolve
    from srgan.gan import TrainGanConfig, train_gan

    cfg = resolve(TrainGanConfig, config_file, data=data, out=out, pretrained=False if no_pretrained else None,
                  **flags)
    final = train_gan(cfg, resume=resume, progress=not quiet)
    click.echo(f"generator: {final}")
    if cfg.ema:
        click.echo(f"generator (EMA): {final.with_name('generator-ema.safetensors')}")


COMMANDS += [train_critic_cmd, train_gan_cmd]
