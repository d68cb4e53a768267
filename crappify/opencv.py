"""OpenCV, loaded with a cap on the size of image its decoders will allocate.

OpenCV reads `OPENCV_IO_MAX_IMAGE_PIXELS` once, when its library loads, and refuses to decode anything larger;
its own default (2^30 pixels, ~3 GB for RGB) lets one crafted file take gigabytes per worker. The cap is set
here to Pillow's default limit (`DEFAULT_MAX_PIXELS`, also `--max-pixels`' default) before `cv2` is imported,
and `crappify/__init__.py` imports this module first, so every crappify module that imports cv2 gets the capped
library. A value already in the environment is kept. Images OpenCV refuses for their size are decoded by Pillow
instead (a larger `--max-pixels` still works, more slowly). If something imported cv2 before crappify, the cap
is OpenCV's own; the header checks in `crappify.imageio` still refuse bombs before any decoder runs.
"""

from __future__ import annotations

import os

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import cv2  # noqa: E402  (after the environment variable: OpenCV reads it when it loads)


def max_decode_pixels() -> int:
    """The pixel count above which OpenCV's decoders refuse an image in this process."""
    try:
        return int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
    except (KeyError, ValueError):
        return 1 << 30  # OpenCV's default


__all__ = ["DEFAULT_MAX_PIXELS", "cv2", "max_decode_pixels"]
