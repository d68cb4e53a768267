"""Inference commands: `enhance`, `evaluate`, `export` and `save-preds` — use, measure and ship a generator.

torch and `srgan` are imported inside the commands, so `crappify --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from crappify.cli.options import config_option, device_option, offline_option, stage_precision_option
from crappify.errors import ConfigError


@click.command("enhance")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-m", "--model", required=True, help="generator.safetensors, or a run folder holding one.")
@click.option("-o", "--out", "out", required=True, help="Output folder (names and sub-folders are kept).")
@click.option("--scale", type=int, help="U-Nets: upscale factor applied before the model (default: the scale of its "
                                        "training data, recorded in the model file; 1 keeps the size); "
                                        "SR models: must equal the model's own scale.")
@click.option("--tile", type=int, help="Tile side in input px (default 512 output px, 1024 on CUDA; 0 = whole image).")
@click.option("--overlap", type=int, help="Overlap of neighbouring tiles in input px (default tile/8).")
@click.option("--batch", type=int, help="Tiles per forward pass (default 1).")
@device_option("auto, cpu, cuda, cuda:N.", default="auto", show_default=True)
@stage_precision_option("auto: bf16 on GPUs (fp16 on old ones), fp32 on most CPUs; falls back to fp32 where "
                        "unsupported.", default="auto", show_default=True)
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality.")
@click.option("--max-pixels", "max_pixels", type=click.IntRange(min=1),
              help="Skip a photo whose output (its size x the scale) would have more pixels than this "
                   "(default: the decoding limit, 89,478,485).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that already exist (default: skip them).")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the generator (tiles all --tile px; the first photo includes compilation).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def enhance_cmd(inputs: tuple[str, ...], model: str, out: str, scale: int | None, tile: int | None,
                overlap: int | None, batch: int | None, device: str, precision: str, quality: int,
                max_pixels: int | None, overwrite: bool, compile_model: bool, quiet: bool) -> None:
    """Enhance photos (files and/or folders, recursive) with a trained generator, tile by tile."""
    from srgan.enhance import enhance

    res = enhance(inputs, model, out, scale=scale, tile=tile, overlap=overlap, batch=batch, device=device,
                  precision=precision, quality=quality, max_pixels=max_pixels, overwrite=overwrite,
                  progress=not quiet, note=lambda text: click.echo(f"crappify: note: {text}", err=True),
                  report=lambda text: click.echo(f"crappify: {text}", err=True), compile=compile_model)
    text = f"enhanced {len(res.written)} image(s) (x{res.scale}) -> {out}"
    if res.skipped:
        text += f"; {len(res.skipped)} already there (--overwrite to redo)"
    if res.failed:
        text += f"; {len(res.failed)} skipped (could not be read or written, too large or out of memory)"
    click.echo(text)


@click.command("evaluate")
@click.argument("data", required=False)
@click.option("-m", "--model", "models", multiple=True, help="Generator file or run folder; repeat to compare.")
@click.option("-o", "--out", "out", help="Report folder (metrics.csv, report.md, grids/).")
@click.option("--hr", help="Instead of DATA: a benchmark's folder of HR images (e.g. Set5/GTmod12), measured "
                           "as BasicSR measures it (Y channel, border of the scale cropped).")
@click.option("--lr", help="With --hr: its LR images, matched by name (baby.png: baby.png or babyx4.png); the "
                           "scale comes from their sizes.")
@click.option("--scale", type=int, help="With --hr: the scale; without --lr each HR is cropped to a multiple of it "
                                        "and its LR made by MATLAB bicubic.")
@config_option
@offline_option
@click.option("--name", "names", multiple=True, help="Label for each -m, in order (default: run folder name).")
@click.option("--split", help="Dataset split (default: test, else valid).")
@click.option("--limit", type=int, help="Evaluate the first N pairs only.")
@click.option("--grids", type=int, help="Comparison grids for the first N pairs (default 4).")
@click.option("--tile", type=int, help="Tile side in input px (default 512 output px, 1024 on CUDA; 0 = whole image).")
@click.option("--overlap", type=int, help="Overlap of neighbouring tiles in input px (default tile/8).")
@click.option("--batch", type=int, help="Tiles per forward pass.")
@device_option()
@stage_precision_option("Default fp32 (metrics should not depend on the GPU).")
@click.option("--no-lpips", "no_lpips", is_flag=True, default=None, help="Skip LPIPS even if its weights are there.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate_cmd(data: str | None, models: tuple[str, ...], out: str | None, config_file: str | None,
                 names: tuple[str, ...], no_lpips: bool | None, quiet: bool, **flags: Any) -> None:
    """PSNR/SSIM (RGB and Y) and LPIPS of generators beside the bicubic baseline, on DATA (a built dataset) or
    on a benchmark folder (--hr DIR with --scale S or --lr DIR)."""
    from crappify.config import read_yaml, resolve
    from srgan.evaluate import EvaluateConfig, evaluate

    for key, flag in (("models", "-m MODEL"), ("out", "-o REPORT")):
        given = models if key == "models" else out
        if not given and not (config_file and read_yaml(config_file).get(key)):
            raise ConfigError(f"evaluate needs {flag} (or `{key}:` in --config)")
    cfg = resolve(EvaluateConfig, config_file, data=data, models=list(models) or None, out=out,
                  names=list(names) or None, lpips=False if no_lpips else None, **flags)
    report = evaluate(cfg, progress=not quiet)
    click.echo(f"report: {report}")
    click.echo(_summary_table(report))


def _summary_table(report: Path) -> str:
    """The report's first table, for the terminal."""
    lines = report.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| method")), None)
    if start is None:
        return ""
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    return "\n".join(table)


@click.command("export")
@click.option("-m", "--model", required=True, help="generator.safetensors, or a run folder holding one.")
@click.option("--onnx", "onnx_out", type=click.Path(dir_okay=False), help="Write ONNX (dynamic H and W) here.")
@click.option("--torchscript", "ts_out", type=click.Path(dir_okay=False), help="Write TorchScript (traced) here.")
@click.option("--pth", "pth_out", type=click.Path(dir_okay=False),
              help="Write the weights in BasicSR's layout as .pth (rrdb and compact trained with normalize: none): "
                   "what spandrel, chaiNNer and Real-ESRGAN's scripts load.")
@click.option("--safetensors", "st_out", type=click.Path(dir_okay=False),
              help="The same BasicSR-layout weights as a flat .safetensors file.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="ONNX: float32, or float16 input, weights and output (for GPUs; chaiNNer feeds float16 to such a "
                   "file). TorchScript is float32.")
@click.option("--verify", is_flag=True,
              help="Before the file takes its name, run it (onnxruntime / TorchScript) against PyTorch on a random "
                   "45x70 image, print the largest difference, and fail if it is over --tolerance.")
@click.option("--tolerance", type=click.FloatRange(min=0), help="Largest difference --verify accepts, on [0, 1] "
                                                                 "outputs (default 1e-3, 2e-2 with fp16).")
@click.option("--overwrite", is_flag=True, help="Replace output files that already exist.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def export_cmd(model: str, onnx_out: str | None, ts_out: str | None, pth_out: str | None, st_out: str | None,
               opset: int, dtype: str, verify: bool, tolerance: float | None, overwrite: bool, quiet: bool) -> None:
    """Export a generator for use elsewhere: RGB in [0, 1] in, RGB in [0, 1] out (×scale); ONNX and TorchScript
    graphs of any generator, or BasicSR-layout weights (spandrel/chaiNNer) of rrdb and compact."""
    from srgan.checkpoint import model_file
    from srgan.export import check_basicsr, check_target, export_basicsr, export_onnx, export_torchscript

    if not (onnx_out or ts_out or pth_out or st_out):
        raise ConfigError("nothing to export: give --onnx OUT.onnx, --torchscript OUT.pt, --pth OUT.pth and/or "
                          "--safetensors OUT.safetensors")
    if pth_out and not pth_out.endswith(".pth"):
        raise ConfigError(f"--pth {pth_out}: give a file name ending in .pth")
    if st_out and not st_out.endswith(".safetensors"):
        raise ConfigError(f"--safetensors {st_out}: give a file name ending in .safetensors")
    if dtype != "fp32" and not onnx_out:
        raise ConfigError("--dtype applies to the ONNX file; give --onnx OUT.onnx (TorchScript is float32)")
    path = model_file(model)
    for out in (onnx_out, ts_out, pth_out, st_out):
        if out:
            check_target(out, overwrite, path)  # every target refused before any is made
    if pth_out or st_out:
        check_basicsr(path)
    note = None if quiet else (lambda text: click.echo(f"crappify: {text}", err=True))
    options = {"verify": verify, "tolerance": tolerance, "overwrite": overwrite, "note": note, "report": click.echo}
    if onnx_out:
        click.echo(f"onnx: {export_onnx(path, onnx_out, opset=opset, dtype=dtype, **options)}")
    if ts_out:
        click.echo(f"torchscript: {export_torchscript(path, ts_out, **options)}")
    for out in (pth_out, st_out):
        if out:
            click.echo(f"basicsr: {export_basicsr(path, out, **options)}")


@click.command("save-preds")
@click.argument("data")
@click.option("-o", "--out", "out", required=True, help="Run directory holding generator.safetensors.")
@device_option("auto, cpu, cuda, cuda:N.", default="auto", show_default=True)
def save_preds_cmd(data: str, out: str, device: str) -> None:
    """Write a trained generator's outputs for every pair of DATA to RUN/preds/<split>/ (skips existing)."""
    from srgan.predict import save_preds
    from srgan.runtime import resolve_device

    n = save_preds(out, data, resolve_device(device))
    click.echo(f"predictions: {n} written to {Path(out) / 'preds'}")


COMMANDS: list[click.Command] = [enhance_cmd, evaluate_cmd, export_cmd, save_preds_cmd]
