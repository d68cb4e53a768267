"""Exceptions that carry a message meant for the user.

The command-line layer prints a `CrappifyError` as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CrappifyError(Exception):
    """An error the user caused (bad path, bad config, missing data): shown as one line."""


class ConfigError(CrappifyError, ValueError):
    """A configuration value, preset or option is invalid."""
