"""Data commands: `build-dataset`, `merge-datasets`, `preview`, `presets`, `ops` — the `crappify` core only, no
`srgan`."""

from __future__ import annotations

import inspect
from typing import Any

import click

from crappify.cli.options import SOURCE_CHOICE, config_option
from crappify.errors import ConfigError, CrappifyError


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


@click.command("build-dataset")
@click.argument("src")
@click.argument("out")
@config_option
@click.option("--source", type=SOURCE_CHOICE, help="Source layout (default: auto-detect).")
@click.option("--preset", help="Preset name (see `crappify presets`) or a preset YAML file.")
@click.option("--size", type=int, help="HR short side in px; smaller photos are skipped, never upscaled.")
@click.option("--square", type=int, help="HR squashed to exactly N x N px (bicubic, aspect not kept, smaller "
                                         "photos upscaled); instead of --size.")
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
@click.option("--shard", help="K/N: build only part K of N disjoint parts (for a job array); join the parts "
                             "with `crappify merge-datasets`.")
@click.option("--overwrite", is_flag=True, help="Rebuild OUT even if it was built with another config.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_dataset_cmd(src: str, out: str, config_file: str | None, split_: str | None, copy_hr: bool | None,
                      overwrite: bool, quiet: bool, **flags: Any) -> None:
    """Build paired LR/HR data from the photos in SRC (or 'samples') into OUT."""
    from crappify.builder import BuildConfig, build_dataset, check_built
    from crappify.config import resolve

    cfg = resolve(BuildConfig, config_file, src=src, out=out, split=_split(split_),
                  link_hr=False if copy_hr else None, **flags)
    res = build_dataset(cfg, overwrite=overwrite, progress=not quiet)
    check_built(res, cfg)
    click.echo(_summary(res) + (f"; shard {cfg.shard}: join the parts with `crappify merge-datasets`"
                                if cfg.shard else ""))


@click.command("merge-datasets")
@click.argument("parts", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, help="Folder of the whole dataset (new, or an earlier merge "
                                                           "of the same parts).")
def merge_datasets_cmd(parts: tuple[str, ...], out: str) -> None:
    """Join the PARTs built with `build-dataset --shard K/N` into the dataset one machine would build."""
    from crappify.merge import merge_datasets

    res = merge_datasets(parts, out)
    if res.built == 0:
        raise CrappifyError(f"no pairs in the {res.parts} parts: {res.skipped} file(s) skipped "
                            f"(see {res.out / 'skipped.csv'})")
    splits = " / ".join(f"{k} {v}" for k, v in res.per_split.items())
    text = (f"merged {res.parts} parts: {res.built} pairs ({splits}) -> {res.out}; {res.linked} files linked, "
            f"{res.copied} copied, {res.kept} already there")
    if res.skipped:
        text += f"; {res.skipped} skipped (see {res.out / 'skipped.csv'})"
    click.echo(text)


@click.command("preview")
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
    from crappify.preview import preview_file

    click.echo(f"wrote {preview_file(image, preset, output, seed, size, scale, item_id, height)}")


@click.command("presets")
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


@click.command("ops")
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


COMMANDS: list[click.Command] = [build_dataset_cmd, merge_datasets_cmd, preview_cmd, presets_cmd, ops_cmd]
