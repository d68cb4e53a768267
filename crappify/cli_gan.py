"""`crappify train-critic` and `crappify train-gan`: critic pretraining and GAN training."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
