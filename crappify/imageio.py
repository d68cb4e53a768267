"""Reading photos of any kind into HWC uint8 RGB, and writing files atomically.

Decoding rules (applied in this order, so HR and LR stay aligned):
1. the pixel count is checked from the header before any decoding (decompression bombs are refused);
2. JPEGs are decoded at reduced size through libjpeg's DCT scaling when the caller needs at most half
   the stored size (`need` = the smallest (width, height) it will use);
3. EXIF orientation is applied;
4. the mode becomes 8-bit RGB: greyscale is replicated, 16-bit is scaled (v/257), CMYK/YCbCr/LAB are
   converted by Pillow, palette images are expanded, and transparency (RGBA, LA, PA, palette with a
   transparent index) is composited on white — photos with holes become photos on white paper.
Anything unreadable raises `ImageError` with a short reason for `skipped.csv`.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crappify.errors import CrappifyError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                              ".pgm", ".pnm"})
_COPYABLE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
_EXIF_ORIENTATION = 0x0112


class ImageError(CrappifyError):
    """A file that cannot be used as a photo; the message is the reason."""


def _to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        grey = arr if mode == "I" and arr.max() <= 255 else arr / 257.0  # 8-bit data in a 32-bit container
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    if mode == "F":
        raise ImageError("unsupported mode F (floating-point pixels)")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("RGBa", "La") or mode in ("LA", "PA"):
        img = img.convert("RGBA")
    elif mode == "L" or mode == "1":
        return cv2.cvtColor(np.asarray(img.convert("L")), cv2.COLOR_GRAY2RGB)
    if img.mode == "RGBA":
        rgba = np.asarray(img).astype(np.float32)
        alpha = rgba[..., 3:4] / 255.0
        out = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def _from_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit BGR(A) from OpenCV to 8-bit RGB: values scaled by 1/257, alpha composited on white."""
    x = arr.astype(np.float32) / 257.0
    rgb = x[..., 2::-1]
    if arr.shape[2] == 4:
        alpha = x[..., 3:4] / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _image_error(exc: BaseException) -> ImageError:
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ImageError("file not found")
    if isinstance(exc, PermissionError):
        return ImageError("permission denied")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"decompression bomb: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError("not a recognised image format")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ImageError(f"corrupt or truncated image: {detail}")


# Anything a decoder raises on a bad file is that file's problem, not the run's: Pillow's plugins raise
# OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError... depending on where the data breaks.
_DECODE_ERRORS = (Exception,)


def _reduction(width: int, height: int, need_short: int | None) -> int:
    """Largest DCT scaling denominator (8, 4, 2) that keeps the short side >= need_short."""
    if need_short is None:
        return 1
    short = min(width, height)
    return next((s for s in (8, 4, 2) if -(-short // s) >= need_short), 1)


_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a plain 8-bit JPEG, read from its markers; None when Pillow should look.

    Written here because Pillow's header parser walks every marker in Python (0.1 ms, a tenth of the
    time a Flickr-sized photo takes to build). Anything unusual — EXIF (orientation), Adobe APP14
    (CMYK/YCCK), 12-bit, lossless or arithmetic coding — returns None and takes Pillow's path.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if (marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0") or marker in (0xEE, 0xDA):
            return None
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive (Huffman)
            if i + 10 > n or data[i + 4] != 8:
                return None
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            comps = data[i + 9]
            return (w, h, comps) if comps in (1, 3) and w > 0 and h > 0 else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # lossless, arithmetic, hierarchical
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class Photo:
    """An opened photo: its bytes read once and its header parsed, its pixels not yet decoded.

    Use as a context manager: read `size` / `native`, decide how much resolution is needed, then call
    `pixels`. `data` holds the file's bytes, so a caller copying the file need not read it again.
    Errors from unreadable files come out as `ImageError`.
    """

    def __init__(self, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = path
        self._img: Image.Image | None = None
        try:
            with open(path, "rb") as fh:
                self.data = fh.read()
        except OSError as exc:
            raise _image_error(exc) from None
        if not self.data:
            raise ImageError("empty file")
        head = _jpeg_header(self.data)
        if head is not None:  # plain JPEG: no EXIF, 8-bit RGB or grey
            w, h, comps = head
            self.format, self.orientation, mode = "JPEG", 1, "RGB" if comps == 3 else "L"
            deep = transparent = False
        else:
            img = self._pil()
            w, h = img.size
            mode, self.format = img.mode, img.format or ""
            deep = any("16" in str(tile[3]) for tile in img.tile)  # e.g. a 48-bit PNG that Pillow reads as RGB
            transparent = "transparency" in img.info
            if w * h <= max_pixels:
                try:  # a JPEG's EXIF block is already in `info`; a PNG's may follow the pixels
                    has_exif = self.format != "JPEG" or "exif" in img.info
                    self.orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1) if has_exif else 1
                except _DECODE_ERRORS as exc:
                    self.close()
                    raise _image_error(exc) from None
        if w * h > max_pixels:
            self.close()
            raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        self.rotated = self.orientation in (5, 6, 7, 8)
        self.size = (h, w) if self.rotated else (w, h)  # upright (width, height)
        self._stored = (w, h)
        plain = not deep and not transparent and self.orientation == 1
        self.native = plain and mode == "RGB" and self.format in _COPYABLE_FORMATS
        self.extension = _COPYABLE_FORMATS.get(self.format, ".png")
        # OpenCV's libjpeg-turbo/libpng path decodes 1.3-2.5x faster than Pillow's here; it is used
        # for plain 8-bit RGB/grey JPEG and PNG. A JPEG without its end marker goes to Pillow, which
        # reports truncation (OpenCV would fill the missing rows with grey and carry on).
        self._deep_png = deep and self.format == "PNG" and mode in ("RGB", "RGBA") and self.orientation == 1
        self._fast = plain and mode in ("RGB", "L") and (
            self.format == "PNG" or (self.format == "JPEG" and self.data[-64:].rstrip(b"\0").endswith(b"\xff\xd9")))

    def _pil(self) -> Image.Image:
        """The Pillow image (header parsed, pixels not decoded), opened on first use."""
        if self._img is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    self._img = Image.open(io.BytesIO(self.data))
            except _DECODE_ERRORS as exc:
                raise _image_error(exc) from None
        return self._img

    def pixels(self, need_short: int | None = None, reduce: int | None = None) -> tuple[np.ndarray, int]:
        """Upright HWC uint8 RGB pixels and the DCT reduction used (1 = full size).

        With `need_short`, a JPEG whose short side is at least twice that is decoded at 1/2, 1/4 or 1/8
        size, never below `need_short` on the short side; `reduce` asks for a given reduction (1, 2, 4
        or 8), e.g. the one a dataset's params record.
        """
        if reduce is not None and reduce not in _CV2_REDUCED:
            raise ValueError(f"reduce must be 1, 2, 4 or 8, got {reduce}")
        reduced = (reduce or _reduction(*self._stored, need_short)) if self.format == "JPEG" else 1
        if self._deep_png:  # Pillow keeps only the high byte of 16-bit RGB; scale by 1/257 instead
            return _from_16bit(cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_UNCHANGED)), 1
        if self._fast:
            flags = _CV2_REDUCED[reduced] | cv2.IMREAD_IGNORE_ORIENTATION
            try:
                out = cv2.imdecode(np.frombuffer(self.data, np.uint8), flags)
            except cv2.error:
                out = None  # Pillow below gives the reason
            if out is not None and out.ndim == 3:
                return cv2.cvtColor(out, cv2.COLOR_BGR2RGB), reduced
        img = self._pil()
        try:
            if reduced > 1:
                img.draft(None, (-(-img.size[0] // reduced), -(-img.size[1] // reduced)))
            img.load()
            if self.orientation != 1:
                img = ImageOps.exif_transpose(img)
            return np.ascontiguousarray(_to_rgb8(img)), reduced
        except _DECODE_ERRORS as exc:
            raise _image_error(exc) from None

    def close(self) -> None:
        if self._img is not None:
            self._img.close()
            self._img = None

    def __enter__(self) -> Photo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, need_short: int | None = None,
           reduce: int | None = None) -> np.ndarray:
    """Decode a photo file to upright 8-bit RGB (see the module docstring for the rules)."""
    with Photo(path, max_pixels) as photo:
        return photo.pixels(need_short, reduce)[0]


def encode(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode RGB pixels as PNG (lossless, fast compression) or JPEG with OpenCV."""
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif fmt in ("jpg", "jpeg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        raise ValueError(f"unknown image format {fmt!r}; valid: png, jpg")
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode {fmt}")
    return buf.tobytes()


def _temp_name(path: str | Path) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names (left behind by a killed run)."""
    return name.startswith(".") and ".tmp-" in name


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """Yield a temporary name beside `path` to write; on success it is renamed over `path`, on failure
    removed — so readers never see half a file, whatever writes it (bytes, safetensors, torch.save)."""
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def link_or_copy_atomic(src: str | Path, dst: str | Path, data: bytes | None = None) -> bool:
    """Put `src`'s bytes at `dst` without re-encoding: a hard link where possible, else a copy.

    A link costs a directory entry instead of writing the bytes again (10x cheaper here for a
    Flickr-sized JPEG). Returns True when a link was made. `data`, if given, is `src`'s content
    already in memory, used for the copy fallback.
    """
    try:
        try:  # a new name appears whole: no temporary name needed
            os.link(src, dst)
        except FileExistsError:  # left by an earlier run: swap it atomically
            with replacing(dst) as tmp:
                _unlink(tmp)
                os.link(src, tmp)
    except OSError:  # other filesystem, or links not supported: copy the bytes
        write_atomic(dst, data if data is not None else Path(src).read_bytes())
        return False
    return True


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def save_image_atomic(path: str | Path, img: np.ndarray) -> None:
    """Write an RGB image (format from the extension) atomically."""
    path = Path(path)
    write_atomic(path, encode(img, path.suffix.lower().lstrip(".")))
