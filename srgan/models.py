"""Deprecated: the generator architectures live in `srgan.generators`; this module only forwards to it
(PEP 562 `__getattr__`)."""

import warnings

import srgan.generators as _target

warnings.warn("srgan.models is deprecated; import from srgan.generators", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_target, name)
