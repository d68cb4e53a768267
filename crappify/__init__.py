"""crappify: degrade clean photos on purpose to make paired low/high-quality training data.

Public API: `load_preset`, `Chain`, the op registry `OPS`, and `build_dataset`.
"""

from crappify.chain import PRESETS, Chain, load_preset
from crappify.errors import ConfigError, CrappifyError
from crappify.ops import OPS

__version__ = "0.1.0"
__all__ = ["OPS", "PRESETS", "Chain", "ConfigError", "CrappifyError", "__version__", "load_preset"]
