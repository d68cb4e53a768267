"""Pipeline commands: `crappify run` (end-to-end pipelines from YAML files) and `crappify demo` (the shipped
demo pipeline on sample photos, then its results). The work is `srgan.pipeline` and `srgan.demo`'s."""

from __future__ import annotations

import click

from crappify.cli.options import device_option, offline_option, precision_option, quiet_option
from crappify.precision import precision_override

DEMO_OUT = "runs/demo"  # srgan.demo.DEMO_OUT, written out so `--help` needs no srgan import


def _print_plan(steps) -> None:
    for step in steps:
        click.echo(f"  {step.stage:<14} {step.action:<7} {step.hash}  {step.reason}")


@click.command("run")
@click.argument("pipeline")
@click.option("-o", "--out", help="Output root (default: the pipeline file's `out`).")
@click.option("--from", "start", help="Re-run from this stage on (earlier stages must have finished).")
@click.option("--to", "stop", help="Stop after this stage.")
@click.option("--dry-run", is_flag=True, help="Print what would run, skip or resume, and stop.")
@device_option("auto, cpu, cuda, cuda:N for every training/evaluation stage.")
@precision_option
@click.option("--no-pretrained", "no_pretrained", is_flag=True,
              help="Random encoder and loss-network weights in every stage (no ImageNet weights needed).")
@click.option("--smoke", is_flag=True,
              help="Every stage at toy size on the sample photos installed packages ship (same architectures, "
                   "losses and options; no pretrained weights; fp32 unless --precision), into OUT-smoke "
                   "(or -o): checks that the recipe runs end to end.")
@click.option("--seed", type=click.IntRange(min=0),
              help="The pipeline's seed: every stage that does not set its own takes it (default: the file's, else 0).")
@click.option("--rehearse", is_flag=True,
              help="Every stage at its real settings for a few steps on this device, on the recipe's first photos "
                   "(or a stand-in of its dataset's layout when they are not here), into OUT-rehearse (or -o): time "
                   "per step, memory, and the estimated time of every stage and of the whole run.")
@click.option("--rehearse-steps", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Training steps timed per phase with --rehearse.")
@offline_option
@quiet_option
def run_cmd(pipeline: str, out: str | None, start: str | None, stop: str | None, dry_run: bool,
            device: str | None, precision: str | None, no_pretrained: bool, smoke: bool, seed: int | None,
            rehearse: bool, rehearse_steps: int, quiet: bool) -> None:
    """Run PIPELINE (a YAML file, or a shipped name such as 'demo'): build-dataset → train-gen →
    train-critic → train-gan → evaluate, skipping stages already done with the same config and resuming
    an interrupted one. Run the same command again after an interruption."""
    from crappify.errors import CrappifyError
    from srgan.distributed import is_main
    from srgan.pipeline import check_data, find_pipeline, load_pipeline, plan, result_file, run_pipeline

    overrides = {"device": device, "precision": precision_override(precision),
                 "pretrained": False if no_pretrained else None}
    path = find_pipeline(pipeline)
    if rehearse:
        from srgan.rehearse import rehearse as rehearse_pipeline

        if smoke or dry_run or start or stop:
            raise CrappifyError("--rehearse runs every stage of the recipe: not with --smoke, --dry-run, --from or "
                                "--to")
        rehearse_pipeline(load_pipeline(path, seed=seed), out, overrides, steps=rehearse_steps, progress=not quiet,
                          report=lambda text: click.echo(text, err=True))
        return
    p = load_pipeline(path, out, smoke=smoke, seed=seed)
    main = is_main()  # under torchrun rank 0 alone reports
    if main:
        click.echo(f"pipeline {p.name}{' (smoke)' if p.smoke else ''} ({path}) -> {p.out}")
    if dry_run:
        steps = plan(p, start, stop, overrides)
        _print_plan(steps)
        try:
            check_data(p, steps)
        except CrappifyError as exc:
            click.echo(f"  data: {exc}")
        return
    run_pipeline(p, start, stop, progress=not quiet, overrides=overrides,
                 on_stage=lambda s: click.echo(f"[{s.stage}] {s.action}: {s.reason}"))
    if main:
        made = result_file(p)
        click.echo(f"pipeline {p.name}: done -> {p.out}"
                   + (f"; the recipe's result: {made}" if made is not None and made.is_file() else ""))


@click.command("demo")
@click.option("-o", "--output", default=DEMO_OUT, show_default=True, type=click.Path(file_okay=False))
@click.option("--pipeline", "pipeline", default="demo", show_default=True,
              help="The pipeline to run (a shipped name or a YAML file); its data must be sample crops.")
@device_option()
@precision_option
@offline_option
@quiet_option
def demo_cmd(output: str, pipeline: str, device: str | None, precision: str | None, quiet: bool) -> None:
    """The whole chain on photos that installed packages ship (pipelines/demo.yaml): crops, dataset,
    generator, critic, a short GAN phase and an evaluation against bicubic. No download. Run it again
    after an interruption: finished stages are skipped."""
    from srgan.demo import run_demo

    run_demo(pipeline, output, device=device, precision=precision_override(precision), progress=not quiet,
             report=click.echo)


COMMANDS: list[click.Command] = [run_cmd, demo_cmd]
