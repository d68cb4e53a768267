"""`crappify run`: end-to-end pipelines from YAML files, and `crappify demo`, which runs the shipped one."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from crappify.errors import ConfigError

COMMANDS: list[click.Command] = []
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_ENV = "CRAPPIFY_PRECISION"


def precision_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--precision` for every training/evaluation stage of a pipeline (`run` and `demo`)."""
    return click.option("--precision", type=click.Choice(PRECISIONS),
                        help=f"Precision of every training/evaluation stage (default: "
                             f"${PRECISION_ENV} if set, else each stage's own).")(fn)


def precision_override(flag: str | None) -> str | None:
    """The precision override: the flag, else $CRAPPIFY_PRECISION (checked here, so a typo in it is one line
    before anything runs), else None — each stage keeps its own default."""
    if flag is not None:
        return flag
    value = os.environ.get(PRECISION_ENV, "").strip()
    if not value:
        return None
    if value not in PRECISIONS:
        raise ConfigError(f"{PRECISION_ENV}={value!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    return value


def _print_plan(steps) -> None:
    for step in steps:
        click.echo(f"  {step.stage:<14} {step.action:<7} {step.hash}  {step.reason}")


@click.command("run")
@click.argument("pipeline")
@click.option("-o", "--out", help="Output root (default: the pipeline file's `out`).")
@click.option("--from", "start", help="Re-run from this stage on (earlier stages must have finished).")
@click.option("--to", "stop", help="Stop after this stage.")
@click.option("--dry-run", is_flag=True, help="Print what would run, skip or resume, and stop.")
@click.option("--device", help="auto, cpu, cuda, cuda:N for every training/evaluation stage.")
@precision_option
@click.option("--no-pretrained", "no_pretrained", is_flag=True,
              help="Random encoder and loss-network weights in every stage (no ImageNet weights needed).")
@click.option("--smoke", is_flag=True,
              help="Every stage at toy size on the sample photos installed packages ship (same architectures, "
                   "losses and options; no pretrained weights; fp32 unless --precision), into OUT-smoke "
                   "(or -o): checks that the recipe runs end to end.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_cmd(pipeline: str, out: str | None, start: str | None, stop: str | None, dry_run: bool,
            device: str | None, precision: str | None, no_pretrained: bool, smoke: bool, quiet: bool) -> None:
    """Run PIPELINE (a YAML file, or a shipped name such as 'demo'): build-dataset → train-gen →
    train-critic → train-gan → evaluate, skipping stages already done with the same config and resuming
    an interrupted one. Run the same command again after an interruption."""
    from srgan.pipeline import find_pipeline, load_pipeline, plan, run_pipeline

    overrides = {"device": device, "precision": precision_override(precision),
                 "pretrained": False if no_pretrained else None}
    path = find_pipeline(pipeline)
    p = load_pipeline(path, out, smoke=smoke)
    if dry_run:
        from crappify.errors import CrappifyError
        from srgan.pipeline import check_data

        click.echo(f"pipeline {p.name}{' (smoke)' if p.smoke else ''} ({path}) -> {p.out}")
        steps = plan(p, start, stop, overrides)
        _print_plan(steps)
        try:
            check_data(p, steps)
        except CrappifyError as exc:
            click.echo(f"  data: {exc}")
        return
    click.echo(f"pipeline {p.name}{' (smoke)' if p.smoke else ''} ({path}) -> {p.out}")
    run_pipeline(p, start, stop, progress=not quiet, overrides=overrides,
                 on_stage=lambda s: click.echo(f"[{s.stage}] {s.action}: {s.reason}"))
    click.echo(f"pipeline {p.name}: done -> {p.out}")


COMMANDS.append(run_cmd)
