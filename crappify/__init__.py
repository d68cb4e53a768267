"""crappify: degrade clean photos on purpose to make paired low/high-quality training data.

Public API: `load_preset`, `Chain`, the op and preset registries `OPS` and `PRESETS`, and the errors; datasets are
built by `crappify.builder.build_dataset` (imported on use: it is not needed to degrade one image).
"""

# First: sets OpenCV's decoder pixel cap, which OpenCV reads only when it loads (see crappify/opencv.py).
import crappify.opencv  # noqa: F401
from crappify.chain import PRESETS, Chain, load_preset
from crappify.errors import ConfigError, CrappifyError
from crappify.ops import OPS

__version__ = "0.1.0"
__all__ = ["OPS", "PRESETS", "Chain", "ConfigError", "CrappifyError", "__version__", "load_preset"]
