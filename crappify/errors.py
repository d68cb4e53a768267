"""Exceptions that carry a message meant for the user.

The command-line layer prints a `CrappifyError` as one line and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib
from typing import Any


class CrappifyError(Exception):
    """An error the user caused (bad path, bad config, missing data): shown as one line."""


class ConfigError(CrappifyError, ValueError):
    """A configuration value, preset or option is invalid."""


class Interrupted(CrappifyError):
    """A run stopped on request (SIGTERM) after saving where it was: shown as one line, exit status 143.

    `where` says where it stopped and what was kept; `how` how to continue (the stage's `--resume`; a pipeline
    says to run the same command again)."""

    def __init__(self, where: str, how: str = "run it again with --resume to continue") -> None:
        super().__init__(f"{where}; {how}")
        self.where, self.how = where, how

    def __str__(self) -> str:  # fastai prefixes the args of an exception raised in a callback; not this one's text
        return f"{self.where}; {self.how}"


_BRIEF = reprlib.Repr()  # (keyword arguments need Python 3.12)
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 40, 40, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value: Any) -> str:
    """A short repr of a user's value for a one-line message: bounded in length and in the work it takes,
    whatever the value holds (a nested or aliased YAML value would otherwise be formatted in full)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
