"""Deprecated: train-gan lives in `srgan.train_gan`; this module only forwards to it (PEP 562 `__getattr__`)."""

import warnings

import srgan.train_gan as _target

warnings.warn("srgan.gan is deprecated; import from srgan.train_gan", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_target, name)
