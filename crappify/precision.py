"""The precisions a stage runs at, named once: the configs' type (`Precision`), the command line's choices
(`PRECISIONS`), and the environment variable every command reads when its `--precision` is not given.

Torch-free, so the command layer's options can use it without importing torch; what each value means on a
device (`auto` → bf16, fp16 or fp32) is `srgan.runtime`'s business.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from crappify.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
PRECISION_ENV = "CRAPPIFY_PRECISION"


def precision_override(flag: str | None) -> str | None:
    """The precision a command was asked for: the flag, else $CRAPPIFY_PRECISION (checked here, so a typo in it
    is one line before anything runs), else None — the config's or the stage's own default."""
    if flag is not None:
        return flag
    value = os.environ.get(PRECISION_ENV, "").strip()
    if not value:
        return None
    if value not in PRECISIONS:
        raise ConfigError(f"{PRECISION_ENV}={value!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    return value
