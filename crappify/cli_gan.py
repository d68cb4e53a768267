"""Deprecated: `train-critic` and `train-gan` live in `crappify.cli.train`, `degrade_options` in
`crappify.cli.options`. This module only re-exports them."""

import warnings

from crappify.cli.options import degrade_options
from crappify.cli.train import train_critic_cmd, train_gan_cmd

COMMANDS = [train_critic_cmd, train_gan_cmd]
__all__ = ["COMMANDS", "degrade_options", "train_critic_cmd", "train_gan_cmd"]

warnings.warn("crappify.cli_gan is deprecated; import from crappify.cli.train and crappify.cli.options",
              DeprecationWarning, stacklevel=2)
