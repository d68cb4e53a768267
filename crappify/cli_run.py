"""Deprecated: `run` and `demo` live in `crappify.cli.run`, the precision option and override in
`crappify.cli.options`. This module only re-exports them."""

import warnings

from crappify.cli.options import PRECISION_ENV, PRECISIONS, precision_option, precision_override
from crappify.cli.run import run_cmd

COMMANDS = [run_cmd]
__all__ = ["COMMANDS", "PRECISIONS", "PRECISION_ENV", "precision_option", "precision_override", "run_cmd"]

warnings.warn("crappify.cli_run is deprecated; import from crappify.cli.run and crappify.cli.options",
              DeprecationWarning, stacklevel=2)
