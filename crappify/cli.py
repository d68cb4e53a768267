"""The `crappify` command-line app.

User errors (bad paths, bad config, unusable data) end with one line on stderr and a non-zero exit;
a traceback means a bug. A training stage stopped by SIGTERM (after saving where it was) says so in one
line and exits with 143, as a process ended by SIGTERM does.
"""

from __future__ import annotations

import inspect
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from crappify.cli_gan import degrade_options
from crappify.cli_run import precision_option, precision_override
from crappify.errors import ConfigError, CrappifyError, Interrupted

DEMO_OUT = Path("runs") / "demo"


def _split(value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"--split expects three ratios like 0.9,0.05,0.05, got {value!r}") from None
    if len(parts) != 3:
        raise ConfigError(f"--split expects three ratios like 0.9,0.05,0.05, got {value!r}")
    return parts  # type: ignore[return-value]


def _summary(res: Any) -> str:
    splits = " / ".join(f"{k} {v}" for k, v in res.per_split.items())
    rate = (res.built + res.skipped - res.reused) / res.seconds if res.seconds > 0 else 0.0
    text = f"built {res.built} pairs ({splits}) in {res.seconds:.2f} s ({rate:.1f} img/s) -> {res.out}"
    if res.reused:
        text += f"; {res.reused} reused from an earlier run"
    if res.skipped:
        text += f"; {res.skipped} skipped (see {res.out / 'skipped.csv'})"
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="crappify")
def app() -> None:
    """crappify: degrade clean photos into paired LR/HR training data, and learn to undo it."""


@app.command("build-dataset")
@click.argument("src")
@click.argument("out")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (flags override it).")
@click.option("--source", type=click.Choice(["auto", "folder", "flickr30k", "celeba", "celeba-hq", "samples"]),
              help="Source layout (default: auto-detect).")
@click.option("--preset", help="Preset name (see `crappify presets`) or a preset YAML file.")
@click.option("--size", type=int, help="HR short side in px; smaller photos are skipped, never upscaled.")
@click.option("--scale", type=int, help="HR/LR ratio, for presets that resize to the LR size (default 4).")
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--seed", type=int, help="Global seed (default 0).")
@click.option("--limit", type=int, help="Use at most N photos (proportionally from each split).")
@click.option("--split", "split_", help="train,valid,test ratios where the source has no official split.")
@click.option("--max-pixels", type=int, help="Refuse images with more pixels (decompression bombs).")
@click.option("--max-bytes", type=int,
              help="Skip files larger than this many bytes, without reading them (default 256 MiB).")
@click.option("--hr-format", type=click.Choice(["png", "jpg"]), help="Format of HR images that must be re-encoded.")
@click.option("--copy-hr", is_flag=True, default=None,
              help="Copy unchanged HR files instead of hard-linking them to the source.")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT even if it was built with another config.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_dataset_cmd(src: str, out: str, config_file: str | None, split_: str | None, copy_hr: bool | None,
                      overwrite: bool, quiet: bool, **flags: Any) -> None:
    """Build paired LR/HR data from the photos in SRC (or 'samples') into OUT."""
    from crappify.builder import BuildConfig, build_dataset
    from crappify.config import resolve

    cfg = resolve(BuildConfig, config_file, src=src, out=out, split=_split(split_),
                  link_hr=False if copy_hr else None, **flags)
    res = build_dataset(cfg, overwrite=overwrite, progress=not quiet)
    if res.built == 0:
        raise CrappifyError(f"no pairs could be built from {src}: {res.skipped} file(s) skipped "
                            f"(see {res.out / 'skipped.csv'})")
    click.echo(_summary(res))


@app.command("train-gen")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory (shared by later stages).")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (flags override it).")
@click.option("--arch", help="Generator: unet-resnet34 (default), unet-resnet18/50/101/152, unet-small, "
                             "unet-timm:NAME, srresnet, rrdb.")
@click.option("--loss", help="Loss: feature (default), l1, mse, vgg19, tv; combine in --config as {name: weight}.")
@click.option("--size", type=int, help="HR crop size in px (default 128).")
@click.option("--bs", type=int, help="Batch size (default 8).")
@click.option("--epochs", type=int, help="Epochs per phase (default 1); a pretrained U-Net runs frozen then unfrozen.")
@click.option("--lr", type=float, help="Peak learning rate of the one-cycle schedule (default 1e-3).")
@click.option("--no-pretrained", "no_pretrained", is_flag=True, default=None,
              help="Random encoder and loss-network weights (no ImageNet weights needed).")
@click.option("--weights", help="Local file with the encoder's ImageNet weights.")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Mixed precision (default auto).")
@click.option("--workers", "num_workers", type=int, help="Data-loading processes (default: 8 on CUDA, 0 on CPU).")
@click.option("--seed", type=int, help="Seed for weights init and data order (default 0).")
@click.option("--checkpoint-every", type=int,
              help="Also checkpoint every N batches of an epoch (default: at epoch ends only).")
@degrade_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--save-preds", is_flag=True, help="Then write the generator's outputs to RUN/preds/<split>/.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_gen_cmd(data: str, out: str, config_file: str | None, no_pretrained: bool | None, resume: bool,
                  save_preds: bool, quiet: bool, **flags: Any) -> None:
    """Pretrain the generator on a built dataset DATA with a feature loss (fastai Learner)."""
    from crappify.config import resolve
    from srgan.train import Trainer, TrainGenConfig

    cfg = resolve(TrainGenConfig, config_file, data=data, out=out,
                  pretrained=False if no_pretrained else None, **flags)
    from srgan.distributed import is_main

    trainer = Trainer(cfg, resume=resume, progress=not quiet)
    final = trainer.fit()
    if not is_main():  # under torchrun, rank 0 alone writes the files and reports
        return
    click.echo(f"generator: {final}")
    if save_preds:
        from srgan.predict import save_preds as write_preds

        n = write_preds(cfg.out, cfg.data, trainer.device)
        click.echo(f"predictions: {n} written to {Path(cfg.out) / 'preds'}")


@app.command("save-preds")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator.safetensors.")
@click.option("--device", default="auto", show_default=True)
def save_preds_cmd(data: str, out: str, device: str) -> None:
    """Write a trained generator's outputs for every pair of DATA to RUN/preds/<split>/ (skips existing)."""
    from srgan.predict import save_preds
    from srgan.train import resolve_device

    n = save_preds(out, data, resolve_device(device))
    click.echo(f"predictions: {n} written to {Path(out) / 'preds'}")


@app.command("preview")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--preset", default="flickr30k-restore", show_default=True, help="Preset name or YAML file.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--size", type=int, help="HR short side, as in build-dataset.")
@click.option("--scale", type=int, help="HR/LR ratio, as in build-dataset.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--id", "item_id", default="preview", show_default=True,
              help="Item id: with a dataset's seed and an item's id, shows exactly the LR built for it.")
@click.option("--height", default=256, show_default=True, type=int, help="Tile height in px.")
def preview_cmd(image: str, preset: str, output: str, size: int | None, scale: int | None, seed: int,
                item_id: str, height: int) -> None:
    """Write a grid: the original, the result after each op, and the final LR."""
    from crappify.chain import load_preset
    from crappify.imageio import ImageError, decode, save_image_atomic
    from crappify.preview import preview

    if not Path(image).is_file():
        raise CrappifyError(f"image not found: {image}")
    chain = load_preset(preset)
    try:
        img = decode(image)
    except ImageError as exc:
        raise CrappifyError(f"cannot read {image}: {exc}") from None
    if size is not None and min(img.shape[:2]) < size:
        raise CrappifyError(f"{image} is smaller than --size {size} ({img.shape[1]}x{img.shape[0]})")
    out = Path(output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--output must end in .png or .jpg, got {output}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(out, preview(img, chain, seed, size, scale, item_id, height))
    click.echo(f"wrote {out}")


@app.command("presets")
@click.argument("name", required=False)
def presets_cmd(name: str | None) -> None:
    """List the built-in presets, or print one (NAME) as YAML to copy and edit."""
    from crappify.chain import PRESETS, load_preset

    if name:
        click.echo(load_preset(name).to_yaml(), nl=False)
        return
    for preset in PRESETS:
        chain = load_preset(preset)
        scale = f"x{chain.scale}" if chain.scale else ("--scale" if chain.uses_lr_size else "fixed LR size")
        click.echo(f"{preset:<18} {scale:<14} {chain.description}")


@app.command("ops")
def ops_cmd() -> None:
    """List the degradation ops and their parameters (with defaults)."""
    import crappify.chain  # noqa: F401  (registers the meta-ops `repeat` and `random_order`)
    from crappify.ops import OPS

    for name in OPS:
        cls = OPS.get(name)
        click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for pname, p in cls.params.items():
            click.echo(f"    {pname} ({p.kind}) = {p.default!r}" + (f"  {p.doc}" if p.doc else ""))
        if "steps" in inspect.signature(cls).parameters:  # a meta-op: its nested steps
            click.echo("    steps (list of steps) — required")


@app.command("demo")
@click.option("-o", "--output", default=str(DEMO_OUT), show_default=True, type=click.Path(file_okay=False))
@click.option("--pipeline", "pipeline", default="demo", show_default=True,
              help="The pipeline to run (a shipped name or a YAML file); its data must be sample crops.")
@click.option("--device", help="auto (default), cpu, cuda, cuda:N.")
@precision_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(output: str, pipeline: str, device: str | None, precision: str | None, quiet: bool) -> None:
    """The whole chain on photos that installed packages ship (pipelines/demo.yaml): crops, dataset,
    generator, critic, a short GAN phase and an evaluation against bicubic. No download. Run it again
    after an interruption: finished stages are skipped."""
    from crappify.chain import load_preset
    from crappify.imageio import decode, save_image_atomic
    from crappify.preview import preview
    from crappify.sources import sample_id, sample_photos
    from srgan.inspection import demo_results
    from srgan.pipeline import find_pipeline, load_pipeline, run_pipeline

    precision = precision_override(precision)
    p = load_pipeline(find_pipeline(pipeline), output)
    if p.sample_crops is None:
        raise ConfigError(f"pipeline {p.name} has no sample-crops stage; use `crappify run` for it")
    click.echo(f"crappify demo -> {p.out} (pipeline {pipeline}; device {device or 'auto'}, "
               f"precision {precision or 'per stage'})")
    steps = run_pipeline(p, progress=not quiet, overrides={"device": device, "precision": precision},
                         on_stage=lambda s: click.echo(f"[{s.stage}] {s.action}: {s.reason}"))
    build = next(s.config for s in steps if s.stage == "build-dataset")
    name, path = sample_photos()[0]
    grid_path = Path(p.out) / "preview.png"
    save_image_atomic(grid_path, preview(decode(path), load_preset(build.preset), build.seed, None, build.scale,
                                         sample_id(name)))
    table, results = demo_results(Path(p.out))
    click.echo(table)
    click.echo(f"degradation, op by op ({name}, preset {build.preset}): {grid_path}")
    click.echo(f"results grid (LR | bicubic | generated | HR): {results}")


def _add_commands() -> None:
    """Commands of the later stages live in their own modules (GAN training, inference, pipelines); each
    module lists its click commands in `COMMANDS` and imports heavy libraries only inside them."""
    from crappify import cli_gan, cli_infer, cli_run

    for module in (cli_gan, cli_infer, cli_run):
        for command in module.COMMANDS:
            app.add_command(command)


_add_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and an exit status."""
    # fastai scripts a few activations with torch.jit at import time; torch 2.10+ warns about it every run.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        code = app.main(args=argv, prog_name="crappify", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        _fail("interrupted; run the same command again to resume", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except Interrupted as exc:
        click.echo(f"crappify: {exc}", err=True)
        sys.exit(128 + signal.SIGTERM)
    except CrappifyError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 130)
    except BrokenPipeError:
        sys.exit(1)


def _fail(message: str, code: int) -> None:
    click.echo(f"crappify: error: {message}", err=True)
    sys.exit(code)

if __name__ == "__main__":
    main()
