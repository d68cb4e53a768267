"""Deprecated: train-gen lives in `srgan.train_gen`; this module only forwards to it (PEP 562 `__getattr__`)."""

import warnings

import srgan.train_gen as _target

warnings.warn("srgan.train is deprecated; import from srgan.train_gen", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_target, name)
