"""Reading photos of any kind into HWC uint8 RGB, and writing files atomically.

Decoding rules (applied in this order, so HR and LR stay aligned):
1. the pixel count is checked from the header before any decoding (decompression bombs are refused);
2. JPEGs are decoded at reduced size through libjpeg's DCT scaling when the caller needs at most half
   the stored size (`need` = the smallest (width, height) it will use);
3. EXIF orientation is applied;
4. the mode becomes 8-bit RGB: greyscale is replicated, 16-bit is scaled (v/257), CMYK/YCbCr/LAB are
   converted by Pillow, palette images are expanded, and transparency (RGBA, LA, PA, palette with a
   transparent index) is composited on white — photos with holes become photos on white paper.
Anything unusable raises `ImageError` with a short reason for `skipped.csv`: corrupt data, a header that
disagrees with the decoded pixels, a file that is not a regular file (a FIFO, a device such as /dev/zero
behind a symlink) or is larger than `max_bytes` (both refused before a byte is read). A file that exists but
cannot be read (permissions, I/O error, too many open files) raises `ReadError`, a subclass: the system's
problem, not the photo's, so a build stops instead of skipping it for good. Out of memory stays `MemoryError`.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crappify.errors import CrappifyError
from crappify.opencv import DEFAULT_MAX_PIXELS, max_decode_pixels

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # larger than any photo a camera writes; a file over it is not read
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                              ".pgm", ".pnm"})
_COPYABLE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
# The only Pillow plug-ins a photo is opened with (JPEG's also opens the MPO JPEGs that cameras write; PPM reads
# PGM/PNM too). Never all of them: Pillow hands EPS/PS/PDF to Ghostscript, an external program, whatever the
# file's name says.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM")
GREY_MODES = frozenset({"L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "LA", "La"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112
_LIBPNG_MAX_SIDE = 1_000_000


class ImageError(CrappifyError):
    """A file that cannot be used as a photo; the message is the reason."""


class ReadError(ImageError):
    """A file that exists but could not be read: permissions, an I/O error, too many open files.

    Not the photo's fault, and perhaps gone on the next try, so a build stops (and retries it when resumed)
    rather than skipping it for good; an `ImageError`, so commands that report and skip unreadable inputs
    (enhance) keep doing so."""


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


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _from_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit BGR(A) from OpenCV to 8-bit RGB: values scaled by 1/257, alpha composited on white."""
    x = arr.astype(np.float32) / 257.0
    rgb = x[..., 2::-1]
    if arr.shape[2] == 4:
        alpha = x[..., 3:4] / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    return _to_uint8(rgb)


def _image_error(exc: BaseException) -> ImageError:
    """The reason a decoder gave up on a file's bytes (already in memory: never the system's fault)."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"decompression bomb: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError("not a recognised image format")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ImageError(f"corrupt or truncated image: {detail}")


# What Pillow's plugins and OpenCV raise on bad data, depending on where it breaks. The bytes are in memory,
# so an OSError here is the data's fault too. Not listed, so never taken for a bad file: MemoryError (the
# machine's), and AttributeError, NameError, RuntimeError... (bugs, which keep their traceback).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
                  ZeroDivisionError, OverflowError, Image.DecompressionBombError, cv2.error)

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
    return f"not a regular file ({kind})"


def _open_error(path: str | Path, exc: OSError) -> ImageError:
    """An OSError from opening or reading a source file: the file's fault (gone, a dangling or looping
    symlink) → ImageError; anything else (permissions, I/O, descriptors, memory) → ReadError."""
    if exc.errno == errno.ENOENT:
        if os.path.lexists(path):
            return ImageError("file not found (a symbolic link to nothing)")
        return ImageError("file not found")
    if exc.errno == errno.ELOOP:
        return ImageError("symbolic link loop")
    if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):  # a socket, a folder, a device without a driver
        return ImageError("not a regular file")
    if isinstance(exc, PermissionError):
        return ReadError("permission denied")
    return ReadError(exc.strerror or str(exc) or type(exc).__name__)


def read_source(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """A photo file's bytes, read only once it is known to be a regular file of at most `max_bytes`.

    Symlinks are followed; FIFOs and devices (a link to /dev/zero or /dev/random) are refused before a byte is
    read, so they can neither hang a worker nor fill its memory. Opened non-blocking and checked again on the
    open descriptor, so a file swapped for a FIFO in between changes nothing."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(_not_regular(mode))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb", closefd=True) as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(_not_regular(st.st_mode))
            if st.st_size > max_bytes:
                raise ImageError(f"file too large: {st.st_size} bytes exceeds the limit of {max_bytes} (--max-bytes)")
            data = fh.read(st.st_size + 1)  # one byte more tells whether it grew since fstat
            if len(data) > st.st_size:
                data += fh.read(max_bytes + 1 - len(data))
    except OSError as exc:
        raise _open_error(path, exc) from None
    if len(data) > max_bytes:  # it grew since fstat
        raise ImageError(f"file too large: over the limit of {max_bytes} bytes (--max-bytes)")
    return data


def _reduction(width: int, height: int, need_short: int | None) -> int:
    """Largest DCT scaling denominator (8, 4, 2) that keeps the short side >= need_short."""
    if need_short is None:
        return 1
    short = min(width, height)
    return next((s for s in (8, 4, 2) if -(-short // s) >= need_short), 1)


_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


# Segments the header parser walks through before SOS (each has a 2-byte length). Any other marker before the
# scan — the standalone ones (TEM 0x01, RST0-7 0xD0-0xD7, a second SOI, EOI), 0xFF00, DNL, JPGn, reserved
# codes, a second frame header — sends the file to Pillow, the reference for the header.
_JPEG_SEGMENTS = frozenset({0xC4, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})  # DHT, DQT, DRI, COM, APP0-15
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive (Huffman)


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a plain 8-bit JPEG, read from its markers; None when Pillow should look.

    Written here because Pillow's header parser walks every marker in Python (0.1 ms, a tenth of the
    time a Flickr-sized photo takes to build). Markers are walked as libjpeg walks them: 0xFF fill bytes
    are skipped, standalone markers (TEM, RSTn, SOI, EOI) have no length, every other segment is skipped by
    its length. Only the segments a plain photo has before its first scan are accepted, and the one frame
    header must come before that scan: anything else — a standalone marker or stray byte before the scan,
    a second frame header, a length that does not fit, EXIF (orientation), Adobe APP14 (CMYK/YCCK), MPF,
    12-bit, lossless or arithmetic coding — returns None and takes Pillow's path. So whenever this returns
    a size, it is the size Pillow reads and libjpeg decodes (the fuzz test in tests/hostile/ checks it).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    frame: tuple[int, int, int] | None = None
    while i + 4 <= n:
        if data[i] != 0xFF:  # a stray byte where a marker must be
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        end = i + 2 + length
        if length < 2 or end > n:
            return None
        if marker == 0xDA:  # start of scan: the header is complete
            return frame
        if marker in _JPEG_SOF:
            body = data[i + 4:end]
            if frame is not None or length < 8 or body[0] != 8:
                return None
            h, w, comps = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            if comps not in (1, 3) or length != 8 + 3 * comps or w == 0 or h == 0:
                return None
            frame = (w, h, comps)
        elif not _plain_segment(data, marker, i + 4, end):
            return None
        i = end
    return None


def _plain_segment(data: bytes, marker: int, start: int, end: int) -> bool:
    """Whether the segment whose body is data[start:end] is one a plain photo has before its frame header,
    in a form Pillow reads as well."""
    if marker not in _JPEG_SEGMENTS or marker == 0xEE:  # APP14 Adobe: CMYK/YCCK or RGB-not-YCbCr
        return False
    if marker == 0xDB:
        return _dqt_ok(data, start, end)
    if marker == 0xE0 and data.startswith(b"JFIF", start, end):
        return end - start >= 12  # Pillow reads the version and density
    if marker == 0xE1 and data.startswith(b"Exif\0\0", start, end):
        return False  # orientation: Pillow reads it
    return not (marker == 0xE2 and data.startswith(b"MPF\0", start, end))  # multi-picture: Pillow's MPO


def _dqt_ok(data: bytes, start: int, end: int) -> bool:
    """Whether the DQT segment data[start:end] holds whole tables (what libjpeg and Pillow both require)."""
    i = start
    while i < end:
        precision, table = data[i] >> 4, data[i] & 15
        if precision > 1 or table > 3:
            return False
        i += 1 + 64 * (precision + 1)
    return i == end and end > start


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (its CRC checked); None if it is not there whole."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    if len(data) < 33 or zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (w, h) if w > 0 and h > 0 else None


def file_intact(path: str | Path, size: tuple[int, int], strict_end: bool = False) -> bool:
    """Whether a file a finished build wrote still looks whole: non-empty, its header parses and gives
    `size` (width, height), and its end is not missing (a PNG ends with IEND; with `strict_end`, a JPEG ends
    with EOI; otherwise its last bytes are not all zero).

    What a resumed build checks before it trusts a file its journal lists: dataset images are not fsynced,
    so after a power loss they can be empty or end in zeros. Reads the first 4 KiB and the last 64 bytes
    (Pillow reads the header when the first 4 KiB do not hold it)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:  # checked before opening: a FIFO would block
            return False
        with open(path, "rb") as fh:
            head = fh.read(4096)
            fh.seek(max(0, st.st_size - 64))
            tail = fh.read(64)
    except OSError:
        return False
    if head.startswith(_PNG_SIGNATURE):
        found: tuple[int, int] | None = _png_header(head)
        if found is None or not tail.endswith(_PNG_END):  # IHDR comes first and IEND last in every PNG
            return False
    else:
        if head.startswith(b"\xff\xd8"):
            if strict_end and not tail.endswith(b"\xff\xd9"):
                return False
            jpeg = _jpeg_header(head)
            found = jpeg[:2] if jpeg else None
        else:
            found = None
        if tail.count(0) == len(tail):
            return False
    if found is None:
        found = _pillow_size(path)
    return found == tuple(size)


def _pillow_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from Pillow's header parser, or None if it cannot read one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=PHOTO_FORMATS) as img:
                return img.size
    except _DECODE_ERRORS:
        return None


class Photo:
    """An opened photo: its bytes read once and its header parsed, its pixels not yet decoded.

    Use as a context manager: read `size` / `native`, decide how much resolution is needed, then call
    `pixels`. `data` holds the file's bytes, so a caller copying the file need not read it again.
    Errors from unreadable files come out as `ImageError`.
    """

    def __init__(self, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self._img: Image.Image | None = None
        self.data = read_source(path, max_bytes)
        if not self.data:
            raise ImageError("empty file")
        head = _jpeg_header(self.data)
        if head is not None:  # plain JPEG: no EXIF, 8-bit RGB or grey
            w, h, comps = head
            self.format, self.orientation, mode = "JPEG", 1, "RGB" if comps == 3 else "L"
            deep = transparent = False
            self.mode = mode
        else:
            img = self._pil()
            w, h = img.size
            mode, self.format = img.mode, img.format or ""
            self.mode = mode
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
        self.grey = mode in GREY_MODES
        self.transparent = mode in ALPHA_MODES or (transparent and mode in ("P", "L", "RGB"))
        self.size = (h, w) if self.rotated else (w, h)  # upright (width, height)
        self._stored = (w, h)
        plain = not deep and not transparent and self.orientation == 1
        self.native = plain and mode == "RGB" and self.format in _COPYABLE_FORMATS
        self.extension = _COPYABLE_FORMATS.get(self.format, ".png")
        # OpenCV's libjpeg-turbo/libpng path decodes 1.3-2.5x faster than Pillow's here; it is used
        # for plain 8-bit RGB/grey JPEG and PNG. A JPEG without its end marker goes to Pillow, which
        # reports truncation (OpenCV would fill the missing rows with grey and carry on).
        # libpng refuses a side over 1,000,000 px (its default user limit), printing two warnings of its own on
        # stderr before OpenCV gives up: such a PNG goes to Pillow at once
        png_ok = self.format == "PNG" and max(self._stored) <= _LIBPNG_MAX_SIDE
        self._deep_png = deep and png_ok and mode in ("RGB", "RGBA") and self.orientation == 1
        self._fast = plain and mode in ("RGB", "L") and (
            png_ok or (self.format == "JPEG" and self.data[-64:].rstrip(b"\0").endswith(b"\xff\xd9")))

    def _pil(self) -> Image.Image:
        """The Pillow image (header parsed, pixels not decoded), opened on first use."""
        if self._img is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    self._img = Image.open(io.BytesIO(self.data), formats=PHOTO_FORMATS)
            except _DECODE_ERRORS as exc:
                raise _image_error(exc) from None
            if self._img.size != getattr(self, "_stored", self._img.size):  # our JPEG parser and Pillow's differ
                raise ImageError(f"inconsistent header: {_wxh(self._stored)} read from the markers, "
                                 f"{_wxh(self._img.size)} by Pillow")
        return self._img

    def _check_shape(self, arr: np.ndarray | None, reduced: int, upright: bool) -> np.ndarray:
        """`arr` if it has the size the header announced (at 1/`reduced`), else ImageError: a decoder that
        read another frame than the header's must never hand back more (or other) pixels than were checked."""
        if arr is None:
            raise ImageError("the decoder returned no pixels")
        w, h = (-(-d // reduced) for d in self._stored)
        if upright and self.rotated:
            w, h = h, w
        if arr.shape[:2] != (h, w):
            raise ImageError(f"decoded size {arr.shape[1]}x{arr.shape[0]} differs from the header's {w}x{h}")
        return arr

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
            return self._deep_png_pixels(), 1
        if self._fast:
            flags = _CV2_REDUCED[reduced] | cv2.IMREAD_IGNORE_ORIENTATION
            try:
                out = cv2.imdecode(np.frombuffer(self.data, np.uint8), flags)
            except cv2.error:  # corrupt, or over OpenCV's pixel cap (a --max-pixels above it)
                out = None  # Pillow below decodes it or gives the reason
            if out is not None and out.ndim == 3 and out.dtype == np.uint8:
                return cv2.cvtColor(self._check_shape(out, reduced, upright=False), cv2.COLOR_BGR2RGB), reduced
        img = self._pil()
        try:
            if reduced > 1:  # Pillow picks the largest DCT scale whose size is at least the one asked for
                w, h = img.size
                img.draft(None, (max(1, w // reduced), max(1, h // reduced)))
            img.load()
            if self.orientation != 1:
                img = ImageOps.exif_transpose(img)
            rgb = np.ascontiguousarray(_to_rgb8(img))
        except _DECODE_ERRORS as exc:
            raise _image_error(exc) from None
        return self._check_shape(rgb, reduced, upright=True), reduced

    def pixels_and_alpha(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Upright 8-bit RGB and, for a photo with transparency, its alpha plane kept apart (not composited);
        (rgb, None) otherwise. The same rules as `pixels` (16-bit scaled by 1/257, EXIF applied) — for tools that
        put the alpha back after working on the RGB (enhance)."""
        if not self.transparent:
            return self.pixels()[0], None
        if self._deep_png:
            out = self._deep_png_decoded()
            if out.shape[2] == 4:
                x = out.astype(np.float32) / 257.0
                return _to_uint8(x[..., 2::-1]), _to_uint8(x[..., 3])
            return _from_16bit(out), None
        img = self._pil()
        try:
            img.load()
            if self.orientation != 1:
                img = ImageOps.exif_transpose(img)
            rgba = self._check_shape(np.asarray(img.convert("RGBA")), 1, upright=True)
        except _DECODE_ERRORS as exc:
            raise _image_error(exc) from None
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])

    def _deep_png_pixels(self) -> np.ndarray:
        """A 16-bit RGB(A) PNG decoded by OpenCV, scaled to 8 bits (alpha composited on white)."""
        return _from_16bit(self._deep_png_decoded())

    def _deep_png_decoded(self) -> np.ndarray:
        """A 16-bit RGB(A) PNG decoded by OpenCV (BGR(A), uint16); ImageError if OpenCV cannot decode it."""
        try:
            out = cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:
            out = None
        if out is None:
            w, h = self._stored
            if w * h > max_decode_pixels():
                raise ImageError(f"16-bit PNG of {w}x{h} pixels is over OpenCV's limit of {max_decode_pixels()} "
                                 "(OPENCV_IO_MAX_IMAGE_PIXELS)")
            raise ImageError("corrupt or truncated image: OpenCV cannot decode this 16-bit PNG")
        if out.dtype != np.uint16 or out.ndim != 3 or out.shape[2] not in (3, 4):
            raise ImageError(f"corrupt image: 16-bit PNG decoded as {out.dtype} with shape {out.shape}")
        return self._check_shape(out, 1, upright=False)

    def close(self) -> None:
        if self._img is not None:
            self._img.close()
            self._img = None

    def __enter__(self) -> Photo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def decode(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, need_short: int | None = None,
           reduce: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode a photo file to upright 8-bit RGB (see the module docstring for the rules)."""
    with Photo(path, max_pixels, max_bytes) as photo:
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


# A temporary file's name: the target's, hidden, with this tag and the writing process's pid. The tag is ours
# alone, so a stale-temporary sweep can never take a user's `.notes.tmp-123` for one of ours; a target name too
# long for the tag (file names are at most 255 bytes) is replaced by its hash, so any name that fits the file
# system has a temporary name that fits too.
TEMP_TAG = ".crappify-tmp-"
_NAME_MAX = 255


def temp_prefix(name: str) -> str:
    """The start of every temporary name of the target file `name` (a bare file name), before the pid."""
    prefix = f".{name}{TEMP_TAG}"
    if len(os.fsencode(prefix)) + 10 <= _NAME_MAX:  # room for any pid (at most 10 digits)
        return prefix
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}{TEMP_TAG}"


def _temp_name(path: str | Path) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f"{temp_prefix(name)}{os.getpid()}")


def temp_pid(name: str) -> int | None:
    """The pid in one of our temporary names, or None when `name` is not one (a user's file)."""
    head, tag, pid = name.rpartition(TEMP_TAG)
    if not (name.startswith(".") and tag and len(head) > 1 and pid.isascii() and pid.isdigit()):
        return None
    return int(pid)


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names (left behind by a killed run)."""
    return temp_pid(name) is not None


@contextlib.contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[str]:
    """Yield a temporary name beside `path` to write; on success it is renamed over `path`, on failure
    removed — so readers never see half a file, whatever writes it (bytes, safetensors, torch.save).

    `durable`: fsync the file before the rename and its folder after, so that after a power loss `path` is
    either the old file or the whole new one (used for checkpoints and model files; not for every dataset
    image, where a resumed build verifies what it finds instead)."""
    tmp = _temp_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        _unlink(tmp)
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, durable: bool = False) -> None:
    """Write `data` to `path` atomically (see `replacing`)."""
    with replacing(path, durable) as tmp, open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def write_csv_atomic(path: str | Path, columns: list[str], rows: Iterable[Mapping[str, Any]],
                     ignore_extra: bool = False) -> None:
    """Write `rows` under a header of `columns` as CSV (\n line ends), atomically (see `replacing`).
    `ignore_extra`: keys of a row outside `columns` are dropped instead of being an error."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n",
                            extrasaction="ignore" if ignore_extra else "raise")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


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
