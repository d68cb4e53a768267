"""`crappify run`: end-to-end pipelines from YAML files."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
