"""Click options and choices shared by the commands: precision, device, config file, quiet, the on-the-fly
degradation options, and the choice lists that come from registries.

Nothing here imports torch or `srgan`, so `crappify --help` stays fast. Choices whose registry is cheap to
import (`crappify.sources.SOURCES`) are read from it lazily, on first use; the lists that `srgan` owns (its
registries and its configs' `Literal` fields live in modules that import torch) are written out here, and
`tests/crappify/test_cli.py` checks each against its registry or `Literal` type.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import click

from crappify.precision import PRECISION_ENV, PRECISIONS, precision_override

OFFLINE_ENV = "CRAPPIFY_OFFLINE"
"""Set (to 1) by `--offline`: `srgan.weights` then never touches the network (its `OFFLINE_ENV`)."""
ADV_LOSSES = ("bce", "lsgan", "hinge", "wgan-gp")
"""`srgan.adversarial.ADVERSARIAL`'s names (`TrainGanConfig.adv_loss`)."""
WEIGHTINGS = ("course", "srgan")
"""`srgan.train_gan.TrainGanConfig.weighting`'s values."""
SWITCHINGS = ("adaptive", "fixed", "per-batch")
"""`srgan.train_gan.TrainGanConfig.switching`'s values."""
DEGRADE_MODES = ("offline", "online")
"""`TrainGenConfig.degrade`'s and `TrainGanConfig.degrade`'s values."""
CRITIC_ARCHS = ("gan-critic", "patch", "srgan", "unet-sn")
"""`srgan.critics.CRITICS`'s names. `--arch` stays free text: an unknown name is the config's one-line error."""
LOG_FORMATS = ("csv", "tensorboard")
"""`srgan.runtime.RunOptions.log`'s values."""

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class BatchSize(click.ParamType):
    """`--bs`: a positive integer, or `auto`."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor auto", param, ctx)


class LazyChoice(click.Choice):
    """A `click.Choice` whose choices come from `load()` on first use (parsing a value, or rendering --help),
    so a registry is imported only by the command that needs it."""

    def __init__(self, load: Callable[[], Iterable[str]], case_sensitive: bool = True) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        super().__init__((), case_sensitive)

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:  # click.Choice.__init__ assigns (); the loader decides
        pass


def _source_names() -> list[str]:
    from crappify.sources import SOURCES

    return ["auto", *SOURCES]


SOURCE_CHOICE = LazyChoice(_source_names)
PRECISION_CHOICE = click.Choice(PRECISIONS)


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--config FILE`: options from YAML; flags given on the command line override it."""
    return click.option("--config", "config_file", type=click.Path(),
                        help="YAML file of options (flags override it).")(fn)


def _go_offline(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:  # the environment carries it to srgan.weights, and to torchrun's worker processes
        os.environ[OFFLINE_ENV] = "1"


def offline_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--offline`: pretrained weights only from the local caches, never downloaded (as CRAPPIFY_OFFLINE=1)."""
    return click.option("--offline", is_flag=True, expose_value=False, callback=_go_offline,
                        help="Never touch the network: pretrained weights must be in the local caches "
                             f"(as {OFFLINE_ENV}=1 or HF_HUB_OFFLINE=1).")(fn)


def quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--quiet", is_flag=True, help="No progress bars.")(fn)


def device_option(text: str = "auto (default), cpu, cuda, cuda:N.", **kwargs: Any) -> Decorator:
    return click.option("--device", help=text, **kwargs)


def compile_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--compile` of a training stage (train-gen, train-critic, train-gan): `RunOptions.compile`."""
    return click.option("--compile", "compile", is_flag=True, default=None,
                        help="torch.compile the networks of the training step (pays on long runs; the first "
                             "steps include compilation).")(fn)


def gradient_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """train-gen's and train-critic's `--grad-clip` and `--grad-accum` (`srgan.runtime.StepOptions`; its ranges are
    checked with the config, one line and exit 2)."""
    fn = click.option("--grad-accum", type=int,
                      help="Sum the gradients of N batches into each optimiser step: the step of an N times larger "
                           "batch in one batch's memory (default 1).")(fn)
    return click.option("--grad-clip", type=float,
                        help="Clip the gradient's total L2 norm to at most this before each step (default: none).")(fn)


def log_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--log` of a training stage (train-gen, train-critic, train-gan): `RunOptions.log`."""
    return click.option("--log", type=click.Choice(LOG_FORMATS),
                        help="csv (default): the history files; tensorboard: also TensorBoard event files (each "
                             "loss term, learning rates, previews) in the stage's tensorboard folder; needs "
                             "pip install 'crappify[tensorboard]'.")(fn)


def workers_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--workers", "num_workers", type=int,
                        help="Data-loading processes (default: 8 on CUDA, 0 on CPU).")(fn)


def _precision_or_env(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A stage's `--precision` when given, else $CRAPPIFY_PRECISION when set (as `run` and `demo` read it),
    else the option's default."""
    if ctx.get_parameter_source(param.name) in (click.core.ParameterSource.COMMANDLINE,
                                                 click.core.ParameterSource.ENVIRONMENT):
        return value
    return precision_override(None) or value  # a bad value: ConfigError, the app's one line (exit 2)


def stage_precision_option(text: str = "Mixed precision (default auto).", **kwargs: Any) -> Decorator:
    """`--precision` of one stage (train-gen, train-critic, train-gan, evaluate, enhance); unset, it is
    $CRAPPIFY_PRECISION's value, which then wins over a --config file's as it does over a pipeline's."""
    return click.option("--precision", type=PRECISION_CHOICE, callback=_precision_or_env,
                        help=f"{text} Unset: ${PRECISION_ENV} if set.", **kwargs)


def precision_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--precision` for every training/evaluation stage of a pipeline (`run` and `demo`)."""
    return click.option("--precision", type=PRECISION_CHOICE,
                        help=f"Precision of every training/evaluation stage (default: "
                             f"${PRECISION_ENV} if set, else each stage's own).")(fn)


def degrade_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """train-gen's and train-gan's data options: degradations made on the fly (Real-ESRGAN) and sharpened targets."""
    fn = click.option("--sharpen-gt/--no-sharpen-gt", default=None,
                      help="Train towards USM-sharpened HR crops (and degrade those online), as Real-ESRGAN.")(fn)
    fn = click.option("--degrade-preset", help="With --degrade online: a preset name or YAML file "
                                               "(default: the dataset's own).")(fn)
    return click.option("--degrade", type=click.Choice(DEGRADE_MODES),
                        help="offline (default): the dataset's LR files; online: degrade each HR crop in the "
                             "data loader, anew every epoch, seeded by (seed, epoch, item).")(fn)
