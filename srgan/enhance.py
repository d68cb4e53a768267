"""`crappify enhance`: run a trained generator over photos (files and folders) with tiled inference.

Inputs are read like `build-dataset` reads them (EXIF orientation applied, 16-bit scaled by 1/257,
palette expanded, CMYK converted), except that transparency is kept apart instead of composited: the
RGB channels are enhanced and the alpha channel is resized (bicubic) to the output size and put back.
Greyscale photos come out greyscale. Outputs keep their names and sub-folders (formats that cannot be
written, e.g. GIF, become PNG), are written under a temporary name and renamed, and an existing output
is left alone unless `overwrite`. A file that cannot be read is reported and skipped; the batch goes on. So is
one whose output cannot be written under its name (longer than a file name may be, a folder in the way, or larger
than JPEG or WebP can hold); a write error that every later write would hit too (a full disk, a read-only or
forbidden OUTDIR, an I/O error) stops the batch with one line naming the file, keeping what was written.

Memory: a photo whose output would have more than `max_pixels` pixels is skipped before anything is upscaled
(default `crappify.imageio.DEFAULT_MAX_PIXELS`, the same cap as decoding: ~89.5 Mpx, 268 MB of RGB output); U-Net
inputs are upscaled tile by tile inside the engine (and alpha in blocks of rows and columns), never as one whole
photo, and the engine's working memory is bounded by its tile however long a side is (`srgan.inference`);
running out of memory on one photo (numpy's MemoryError as torch's, or even at the engine's smallest tile) skips
that photo with one line, and the next one starts with the tile asked for.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from crappify.errors import ConfigError, CrappifyError
from crappify.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, Photo, is_temp_name, write_atomic
from srgan.generators import is_unet
from srgan.inference import OutOfMemory, TiledInference, Upscaled, is_oom

WRITABLE = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
            ".tiff": "TIFF"}
ALPHA_WRITABLE = {".png", ".webp", ".tif", ".tiff"}
MAX_SIDE = {"JPEG": 65500, "WEBP": 16383}  # the longest side libjpeg and libwebp can write
NAME_MAX = 255  # bytes in a file name, on every common file system
# Write errors that are the machine's or OUTDIR's, not one photo's: every later write would fail the same way.
STOP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                         errno.EMFILE, errno.ENFILE, errno.ENOMEM})
ALPHA_BLOCK = 16384  # output columns of alpha resized at a time (wider planes only: narrower ones in one piece)


@dataclass
class Loaded:
    """A decoded input: upright RGB pixels, the alpha channel if it has one, and whether it is greyscale."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False


@dataclass
class EnhanceResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # output already there
    failed: list[tuple[Path, str]] = field(default_factory=list)  # input, reason
    scale: int = 1  # output / input size


def check_output_size(width: int, height: int, scale: int, max_pixels: int) -> None:
    """ImageError when a `width`×`height` photo enhanced ×`scale` would have more than `max_pixels` pixels."""
    ow, oh = width * scale, height * scale
    if ow * oh > max_pixels:
        raise ImageError(f"the output would be {ow}x{oh} = {ow * oh} pixels (x{scale}), over the limit of "
                         f"{max_pixels} (--max-pixels)")


def read_input(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, scale: int = 1) -> Loaded:
    """Decode a photo for enhancement through `crappify.imageio.Photo`, transparency kept apart; raises ImageError
    with a short reason for unusable files. A photo whose output (its size × `scale`) would exceed `max_pixels` is
    refused from its header, before decoding."""
    with Photo(path, max_pixels) as photo:
        check_output_size(*photo.size, scale, max_pixels)
        rgb, alpha = photo.pixels_and_alpha()
        return Loaded(rgb, alpha, photo.grey)


def output_path(rel: Path, alpha: bool) -> Path:
    """Where an input's result goes (relative): same name, PNG where the format cannot hold the result."""
    ext = rel.suffix.lower()
    if ext not in WRITABLE or (alpha and ext not in ALPHA_WRITABLE):
        return rel.with_suffix(".png")
    return rel


def encode_output(img: np.ndarray, alpha: np.ndarray | None, grey: bool, ext: str, quality: int = 95) -> bytes:
    """Encode an enhanced image: greyscale as L, alpha re-attached (LA/RGBA), format from the extension."""
    if grey:
        pixels = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        pil = Image.fromarray(np.dstack([pixels, alpha]), "LA") if alpha is not None else Image.fromarray(pixels, "L")
    else:
        pil = Image.fromarray(np.dstack([img, alpha]), "RGBA") if alpha is not None else Image.fromarray(img, "RGB")
    fmt = WRITABLE[ext.lower()]
    if pil.mode == "LA" and fmt in ("WEBP",):
        pil = pil.convert("RGBA")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    if fmt == "PNG":
        kwargs["compress_level"] = 1
    pil.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def collect_inputs(inputs: Iterable[str | Path], out_dir: str | Path) -> list[tuple[Path, Path]]:
    """(input file, output path relative to OUTDIR) for files and folders (recursive, sorted).

    A file keeps its name; a folder's images keep their path inside that folder. Files inside OUTDIR,
    hidden temporary files and non-image extensions inside folders are left out.
    """
    out_dir = Path(out_dir).resolve()
    items: list[tuple[Path, Path]] = []
    for raw in inputs:
        src = Path(raw)
        if src.is_file():
            items.append((src, Path(src.name)))
        elif src.is_dir():
            for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
                here = Path(dirpath)
                if here.resolve() == out_dir or out_dir in here.resolve().parents:
                    dirnames[:] = []
                    continue
                dirnames.sort()
                for name in sorted(filenames):
                    if is_temp_name(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    path = here / name
                    items.append((path, path.relative_to(src)))
        else:
            raise CrappifyError(f"input not found: {src}")
    return items


def enhance_image(engine: TiledInference, loaded: Loaded, scale: int,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Enhanced RGB (size × `scale`) and the alpha resized to match.

    A U-Net (scale 1 inside the model) gets the image resized by `scale` (bicubic), as in training — by the
    engine, tile by tile, not as one whole upscaled photo; an SR model's own scale must be `scale`.
    """
    out = engine(loaded.rgb, progress, input_scale=scale if is_unet(engine.model) else 1)
    alpha = loaded.alpha
    if alpha is not None and scale != 1:
        alpha = upscale_plane(alpha, scale)
    return out, alpha


def upscale_plane(plane: np.ndarray, scale: int, band: int = 256, block: int = ALPHA_BLOCK) -> np.ndarray:
    """A uint8 (H, W) plane resized ×`scale` (bicubic, as `srgan.upsample.resize_image`), `band` output rows by
    `block` columns at a time, so the float intermediates stay the size of a block rather than of the whole output
    (nor of a row, however wide the photo)."""
    src = Upscaled(plane, scale)
    out = np.empty((src.height, src.width), np.uint8)
    for y in range(0, src.height, band):
        y1 = min(y + band, src.height)
        for x in range(0, src.width, block):
            out[y:y1, x:x + block] = src.region(y, y1, x, min(x + block, src.width))
    return out


def unwritable(dst: Path, width: int, height: int) -> str | None:
    """Why an output `width`×`height` cannot be written at `dst`, known before any work: a name longer than a
    file name may be, or a side longer than its format can hold. None when nothing is known against it."""
    size = len(os.fsencode(dst.name))
    if size > NAME_MAX:
        return f"its output name {dst.name[:40]}... is {size} bytes, longer than a file name may be ({NAME_MAX})"
    fmt = WRITABLE.get(dst.suffix.lower())
    if fmt in MAX_SIDE and max(width, height) > MAX_SIDE[fmt]:
        return (f"the output would be {width}x{height}, larger than {fmt} can hold ({MAX_SIDE[fmt]} px a side); "
                "convert the photo to PNG first")
    return None


def write_output(dst: Path, data: bytes) -> str | None:
    """Write one output (its folder made if needed): None when written, else why it could not be, for a skip.
    CrappifyError, one line naming the file, for an error every later write would hit too (`STOP_ERRNOS`)."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dst, data)
    except OSError as exc:
        cause = exc.strerror or str(exc) or type(exc).__name__
        if exc.errno in STOP_ERRNOS:
            raise CrappifyError(f"cannot write {dst}: {cause}; the images written before it are kept (run the "
                                "same command again to go on)") from None
        return f"cannot write {dst}: {cause}"
    return None


def resolve_scale(engine: TiledInference, scale: int | None) -> int:
    """The output/input ratio: an SR model's own scale; for U-Nets `scale`, by default the scale of the data
    the model was trained on (`engine.data_scale`, from the generator file): a U-Net trained on LR photos
    shrunk 4x and resized back learned to sharpen that much blur, so a photo is upscaled 4x for it."""
    if engine.model_scale != 1:
        if scale not in (None, engine.model_scale):
            raise ConfigError(f"this model upsamples by {engine.model_scale}; --scale {scale} cannot be used with it")
        return engine.model_scale
    scale = engine.data_scale if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"--scale must be a positive integer, got {scale!r}")
    return scale


def enhance(inputs: Iterable[str | Path], model: str | Path, out: str | Path, *, scale: int | None = None,
            tile: int | None = None, overlap: int | None = None, batch: int | None = None, device: str = "auto",
            precision: str = "auto", quality: int = 95, max_pixels: int | None = None, overwrite: bool = False,
            progress: bool = True, note: Callable[[str], None] | None = None,
            report: Callable[[str], None] | None = None, compile: bool = False) -> EnhanceResult:
    """`crappify enhance` as one call: the generator file in `model` (a file or run folder) over every photo in
    `inputs` (files and folders, recursive) into `out`, tile by tile. `note` hears remarks on the settings,
    `report` each photo skipped. `compile`: torch.compile the generator, every tile then the full tile size
    (`srgan.inference`), compiled once, in the first photo. CrappifyError when there is nothing to enhance or
    nothing could be."""
    from srgan.checkpoint import model_file
    from srgan.inference import load_inference
    from srgan.runtime import resolve_device

    inputs = [str(i) for i in inputs]
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    path = model_file(model)
    items = collect_inputs(inputs, out)
    if not items:
        raise CrappifyError(f"no image files found in {', '.join(inputs)}")
    engine = load_inference(path, resolve_device(device), precision=precision, tile=tile, overlap=overlap,
                            batch=batch, on_note=note, compile=compile)
    out_scale = resolve_scale(engine, scale)
    if scale is None and engine.model_scale == 1 and out_scale != 1 and note is not None:
        note(f"upscaling x{out_scale} before the U-Net, the scale of the data it was trained on "
             "(--scale 1 keeps the size)")
    res = enhance_files(engine, items, out, out_scale, overwrite=overwrite, progress=progress, jpeg_quality=quality,
                        report=report, max_pixels=max_pixels)
    res.scale = out_scale
    if not res.written and not res.skipped and res.failed:
        raise CrappifyError(f"no image could be enhanced: {len(res.failed)} file(s) skipped (could not be read or "
                            f"written, too large for --max-pixels {max_pixels}, or out of memory)")
    return res


def enhance_files(engine: TiledInference, items: list[tuple[Path, Path]], out_dir: str | Path, scale: int,
                  overwrite: bool = False, progress: bool = True, jpeg_quality: int = 95,
                  report: Callable[[str], None] | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> EnhanceResult:
    """Enhance every (input, relative output) pair into OUTDIR; see the module docstring for the rules.

    `max_pixels`: the most pixels an output (and so an input) may have; larger photos are skipped with a reason.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ConfigError(f"--max-pixels must be a positive integer, got {max_pixels!r}")
    from crappify.runlock import clean_stale_temps, folder_lock

    out_dir = Path(out_dir)
    with folder_lock(out_dir, "enhance run"):  # two runs into one OUTDIR would race on the same names
        # what killed runs left half-written: only our own temporaries, only of the outputs this run writes
        targets: dict[Path, set[str]] = {}
        for _src, rel in items:
            for dst in {output_path(rel, False), output_path(rel, True)}:
                targets.setdefault((out_dir / dst).parent, set()).add(dst.name)
        for folder, names in targets.items():
            clean_stale_temps(folder, names)
        return _enhance_files(engine, items, out_dir, scale, overwrite, progress, jpeg_quality, report, max_pixels)


def _enhance_files(engine: TiledInference, items: list[tuple[Path, Path]], out_dir: Path, scale: int,
                   overwrite: bool, progress: bool, jpeg_quality: int, report: Callable[[str], None] | None,
                   max_pixels: int) -> EnhanceResult:
    from tqdm.auto import tqdm

    batch = _Batch(engine, out_dir, scale, overwrite, jpeg_quality, max_pixels, report or (lambda _msg: None))
    bar = tqdm(items, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for src, rel in bar:
            bar.set_postfix_str(rel.as_posix()[-40:])
            batch.enhance(src, rel, bar)
    finally:
        bar.close()
    return batch.result


@dataclass
class _Batch:
    """One `enhance_files` run: its settings, what it wrote and skipped, and the outputs it has claimed."""

    engine: TiledInference
    out_dir: Path
    scale: int
    overwrite: bool
    quality: int
    max_pixels: int
    say: Callable[[str], None]
    result: EnhanceResult = field(default_factory=EnhanceResult)
    seen: dict[Path, Path] = field(default_factory=dict)

    def skip(self, src: Path, reason: str) -> None:
        self.result.failed.append((src, reason))
        self.say(f"skipped {src}: {reason}")

    def enhance(self, src: Path, rel: Path, bar) -> None:
        """One photo: written, found already there, or skipped with a reason."""
        try:
            loaded = read_input(src, self.max_pixels, self.scale)
        except (ImageError, MemoryError) as exc:
            return self.skip(src, str(exc) if isinstance(exc, ImageError)
                             else "out of memory decoding it (lower --max-pixels)")
        dst = self.out_dir / output_path(rel, loaded.alpha is not None)
        if dst in self.seen:
            return self.skip(src, f"same output {dst} as {self.seen[dst]}")
        self.seen[dst] = src
        height, width = loaded.rgb.shape[:2]
        problem = unwritable(dst, width * self.scale, height * self.scale)
        if problem:
            return self.skip(src, problem)
        if os.path.exists(dst) and not self.overwrite:  # (False, not an error, for a path the system refuses)
            return self.result.skipped.append(dst)

        def tiles(done: int, total: int) -> None:
            if total > 1:
                bar.set_postfix_str(f"{rel.as_posix()[-30:]} tile {done}/{total}")

        try:
            out, alpha = enhance_image(self.engine, loaded, self.scale, tiles)
            data = encode_output(out, alpha, loaded.grey, dst.suffix, self.quality)
        except OutOfMemory as exc:  # even at the engine's smallest tile: not on this device
            return self.skip(src, str(exc))
        except Exception as exc:
            if not is_oom(exc):
                raise
            # what the engine could not get around by shrinking tiles (the output array, the alpha, encoding)
            return self.skip(src, f"out of memory enhancing it x{self.scale} (lower --max-pixels, or free memory)")
        del out, alpha
        problem = write_output(dst, data)
        if problem:
            return self.skip(src, problem)
        self.result.written.append(dst)
