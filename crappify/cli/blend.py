"""Model-file commands: `crappify interpolate`, a blend of two generators of one run (ESRGAN's network
interpolation). The work is `srgan.interpolate`'s; it is imported inside the command, so `--help` stays fast."""

from __future__ import annotations

import click


@click.command("interpolate")
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--alpha", type=float, required=True,
              help="Weight of A, from 0 to 1: the blend is alpha*A + (1-alpha)*B, parameter by parameter "
                   "(1 gives A, 0 gives B; ESRGAN's 0.8 keeps most of a GAN generator A's texture).")
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="The blended generator file to write (e.g. runs/f30k/blend-0.8.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never one of A and B).")
def interpolate_cmd(model_a: str, model_b: str, alpha: float, out: str, overwrite: bool) -> None:
    """Blend two generator files of the same architecture (e.g. A = a run's GAN generator, B its pretrained one)
    into a third that enhance, evaluate and export use like any other. A and B may be run folders."""
    from srgan.checkpoint import model_file
    from srgan.interpolate import check_alpha, interpolate

    check_alpha(alpha)
    a, b = model_file(model_a), model_file(model_b)
    path = interpolate(a, b, alpha, out, overwrite=overwrite)
    click.echo(f"blend: {path} = {alpha:g} x {a} + {1 - alpha:g} x {b}")


COMMANDS: list[click.Command] = [interpolate_cmd]
