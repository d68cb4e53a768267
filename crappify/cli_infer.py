"""`crappify enhance`, `crappify evaluate` and `crappify export`: use, measure and ship a generator."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
