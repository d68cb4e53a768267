"""Where and how a stage runs: the device, one precision policy, the run options every training stage shares,
and SIGTERM handling.

The bottom of srgan: stages (train, critic, gan, evaluate, enhance, ...) import from here, never the other way
round. torch and pydantic only; fastai is not imported.

Precision: `auto_precision` is the one policy, used by training (`resolve_precision`) and inference
(`resolve_inference_precision`) alike — bf16 where the device computes it natively (a GPU that reports it, a
CPU with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32. An explicit request is checked strictly for
training (fp16 off CUDA is a config error) and leniently for inference (fp32 with a note).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from crappify.errors import ConfigError, Interrupted

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class RunOptions(BaseModel):
    """Where and how a training stage runs: the keys train-gen, train-critic and train-gan share."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    num_workers: int | None = Field(None, ge=0, description="data-loading processes; None: 8 on CUDA, 0 on CPU")
    seed: int = Field(0, ge=0)


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else as torch understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that reports it, a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def auto_precision(device: torch.device) -> str:
    """What 'auto' means on `device`: bf16 where it is native, fp16 on older GPUs, else fp32."""
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_precision(precision: str, device: torch.device) -> str:
    """Training: 'auto' → `auto_precision`; fp16 off CUDA is refused (`ConfigError`); else as asked."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on the CPU")
        return precision
    return auto_precision(device)


def resolve_inference_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """Inference: (precision to use, a note when the request could not be honoured).

    auto: `auto_precision`. fp16 needs CUDA and bf16 needs a GPU or CPU that supports it; otherwise fp32 with a
    note.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}; valid: {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if requested == "auto":
        return auto_precision(device), None
    if requested == "fp16" and not cuda:
        return "fp32", f"fp16 is not supported on {device.type}; using fp32"
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "fp32", "this GPU does not support bf16; using fp32"
    if requested == "bf16" and device.type not in ("cpu", "cuda"):
        return "fp32", f"bf16 is not supported on {device.type}; using fp32"
    return requested, None


class StopRequest:
    """Set by SIGTERM (a preempted cloud machine, a cluster scheduler). A training loop reads it at each batch
    boundary, writes a checkpoint where it is and stops with `Interrupted`, so `--resume` loses nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.acted = False  # the stage stopped on it (else it came after the last batch)

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


@contextlib.contextmanager
def sigterm_stops(what: str) -> Iterator[StopRequest]:
    """For the body of a training stage: SIGTERM sets the returned `StopRequest` instead of ending the process.

    Installed in the main thread only (Python runs signal handlers there), each process its own under torchrun;
    the previous handler comes back afterwards. A SIGTERM that came after the last batch, which no batch boundary
    saw, stops the run once the body has finished, so that a pipeline does not go on to its next stage."""
    stop = StopRequest()
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if installed else None
    try:
        yield stop
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if stop.requested and not stop.acted:
        raise Interrupted(f"{what} had finished when SIGTERM arrived; stopped there", "nothing is lost")
