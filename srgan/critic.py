"""Deprecated: train-critic lives in `srgan.train_critic`; this module only forwards to it (PEP 562 `__getattr__`)."""

import warnings

import srgan.train_critic as _target

warnings.warn("srgan.critic is deprecated; import from srgan.train_critic", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_target, name)
