"""Deprecated: `enhance`, `evaluate` and `export` live in `crappify.cli.infer`. This module only re-exports them."""

import warnings

from crappify.cli.infer import _summary_table, enhance_cmd, evaluate_cmd, export_cmd

COMMANDS = [enhance_cmd, evaluate_cmd, export_cmd]
__all__ = ["COMMANDS", "_summary_table", "enhance_cmd", "evaluate_cmd", "export_cmd"]

warnings.warn("crappify.cli_infer is deprecated; import from crappify.cli.infer", DeprecationWarning, stacklevel=2)
