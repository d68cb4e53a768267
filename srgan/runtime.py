"""Where and how a stage runs: the device, one precision policy, the run options every training stage shares,
torch.compile (`compile_module`) and SIGTERM handling.

The bottom of srgan: stages (train_gen, train_critic, train_gan, evaluate, enhance, ...) import from here, never
the other way round. torch and pydantic only; fastai is not imported.

Precision: `auto_precision` is the one policy, used by training (`resolve_precision`) and inference
(`resolve_inference_precision`) alike — bf16 where the device computes it natively (a GPU that reports it, a
CPU with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32. An explicit request is checked strictly for
training (fp16 off CUDA is a config error) and leniently for inference (fp32 with a note).

Compilation: `compile_module` is the one way every stage (train-gen, train-critic, train-gan, enhance) compiles a
network; see its docstring for what is compiled and what stays eager.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from crappify.errors import ConfigError, Interrupted
from crappify.precision import PRECISIONS, Precision

# Adam's settings in a training stage's config (train-gen, train-critic, train-gan): each of `betas` in [0, 1);
# `eps` defaults to fastai's Adam's, which every stage ran before it was an option (torch's and Keras 1's: 1e-8).
Beta = Annotated[float, Field(ge=0, lt=1)]
FASTAI_EPS = 1e-5


# Upper bounds of the options that size memory, checked when a config is validated: generous for any real run
# (published recipes crop at most 512 px, with batches of at most 64), so that a typo is one line instead of a
# 120 GB allocation.
MAX_CROP = 2048
MAX_BATCH = 1024
MAX_WORKERS = 256
MAX_PREVIEW = 64

class AdamOptions(BaseModel):
    """Adam's settings, the keys train-gen, train-critic and train-gan share (train-gan has its own `betas`)."""

    wd: float = Field(1e-3, ge=0, description="Adam's decoupled weight decay (AdamW's); default the fastai course's")
    betas: tuple[Beta, Beta] | None = Field(
        None, description="Adam's (beta1, beta2), beta1 then held for the whole schedule; default fastai's: beta1 "
                          "follows the one-cycle schedule 0.95 -> 0.85 -> 0.95, beta2 0.99")
    eps: float = Field(FASTAI_EPS, gt=0, description="Adam's epsilon; default fastai's 1e-5 (torch's is 1e-8)")


MAX_ACCUM = 1024  # batches per optimiser step


class StepOptions(BaseModel):
    """Gradient clipping and accumulation (fastai's GradientClip and GradientAccumulation), the keys train-gen and
    train-critic share. Both change what is trained: a checkpoint of other values is another config's."""

    grad_clip: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="clip the gradient's total L2 norm to at most this before each "
        "optimiser step (fastai's GradientClip; under fp16 after the loss scale is taken out); default: no clipping")
    grad_accum: int = Field(
        1, ge=1, le=MAX_ACCUM, description="batches whose gradients are summed into one optimiser step: the step of "
        "a grad_accum times larger batch (bs x grad_accum samples per process) in the memory of one batch")


class RunOptions(BaseModel):
    """Where and how a training stage runs: the keys train-gen, train-critic and train-gan share."""

    model_config = ConfigDict(extra="forbid")

    device: str = "auto"
    precision: Precision = "auto"
    channels_last: bool = True
    num_workers: int | None = Field(None, ge=0, le=MAX_WORKERS,
                                    description="data-loading processes; None: 8 on CUDA, 0 on CPU")
    seed: int = Field(0, ge=0)
    compile: bool = Field(False, description="torch.compile the networks of the training step (the model and "
                          "its loss network); the first steps include compilation")
    log: Literal["csv", "tensorboard"] = Field(
        "csv", description="csv: the history files only; tensorboard: also TensorBoard event files (every history "
                           "column, each loss term, learning rates, preview grids) in the stage's tensorboard/ folder")

    @field_validator("log")
    @classmethod
    def _log_writer(cls, value: str) -> str:
        """`tensorboard` only where the package is installed: checked when the config is read, before any stage."""
        if value == "tensorboard":
            require_tensorboard()
        return value


def require_tensorboard() -> None:
    """ConfigError (one line) when the tensorboard package, an optional extra that `--log tensorboard` writes
    through (torch.utils.tensorboard), is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install 'crappify[tensorboard]' "
                          "(or pip install tensorboard), or log to csv only") from None


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


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its convolutions still have native bf16 kernels
ONEDNN_BF16_ISAS = frozenset({"ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512",
                              "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16"})


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that reports it, a CPU with AVX512-BF16 or AMX whose
    kernels may use it. The CPU flags alone are not enough: ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA may cap
    torch below AVX-512 (how an AVX2-only CPU is approximated on a newer one), and bf16 then runs on slow
    emulated kernels, where fp32 is what that CPU would get."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            return False
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        if isa and isa not in ONEDNN_BF16_ISAS:
            return False
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


class CompiledForward:
    """What `compile_module` puts in place of a module's `forward`: the compiled forward, or with `grad_only` the
    original one for calls made with autograd off. `eager` and `compiled` are the two."""

    def __init__(self, eager: Any, compiled: Any, grad_only: bool) -> None:
        self.eager, self.compiled, self.grad_only = eager, compiled, grad_only

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.grad_only and not torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def check_compile(device: torch.device | str) -> None:
    """ConfigError (one line, before anything runs) when torch.compile cannot work here: Python versions
    TorchDynamo does not support, a CPU without a C++ compiler, CUDA without Triton."""
    device = torch.device(device)
    try:
        from torch._dynamo import is_dynamo_supported

        supported = is_dynamo_supported()
    except ImportError:  # the check itself moved: let torch.compile say it
        supported = True
    if not supported:
        raise ConfigError("--compile: torch.compile does not support this Python version; run without --compile")
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
        except ImportError:
            return
        try:
            get_cpp_compiler()
        except Exception:
            raise ConfigError("--compile on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); "
                              "install one or run without --compile") from None
    elif device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return
        if not has_triton():
            raise ConfigError("--compile on CUDA needs Triton (pip install triton); run without --compile")


def compile_module(module: nn.Module, enabled: bool, device: torch.device | str, *, grad_only: bool = False,
                   dynamic: bool | None = False) -> nn.Module:
    """`module` with its forward compiled by torch.compile (inductor, default mode) when `enabled`; else `module`
    untouched. Every stage compiles through this.

    The module is compiled in place and returned: its class, attributes, hooks and state-dict keys stay as they
    are (`torch.compile(module)` would wrap it in an `OptimizedModule` whose keys carry an `_orig_mod.` prefix),
    so generator, critic and checkpoint files written from it are those of an uncompiled run, and a resume may
    switch compilation on or off. The forward is what is compiled, so the module's own forward hooks (fastai's
    U-Net skip connections live on its children) are inside the graph.

    `grad_only`: only calls made with autograd on — the training step — run compiled; calls without it
    (validation, preview grids, a GAN's fakes for its critic) run the same forward eagerly, since each of those
    (eval mode, another batch size) would be one more compilation. `dynamic=False`: one graph per input shape —
    training crops and inference tiles have fixed sizes — compiled when a shape is first seen (a schedule's
    frozen/unfrozen phases and crop sizes each compile once; torch falls back to eager after 8). Compiling takes
    seconds to minutes (minutes on a CPU, where inductor compiles C++) and happens in the first call.
    ConfigError when this machine cannot compile (`check_compile`). Compiling twice is a no-op."""
    if not enabled or isinstance(module.__dict__.get("forward"), CompiledForward):
        return module
    check_compile(device)
    eager = module.forward
    module.forward = CompiledForward(eager, torch.compile(eager, dynamic=dynamic), grad_only)
    return module


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` is a 4-D tensor laid out channels-last (and not also plain contiguous, as a tensor with one
    channel or 1x1 pixels is)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _input_layout(module: nn.Module, args: tuple[Any, ...], out: Any) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) and is_channels_last(args[0]) \
            and not is_channels_last(out):
        return out.contiguous(memory_format=torch.channels_last)
    return None


def keep_input_layout(module: nn.Module) -> nn.Module:
    """`module` made to return a channels-last output for a channels-last input (a forward hook; no parameter,
    key or value changes). For fastai's SelfAttention, which ends in `.contiguous()`: with `channels_last` on,
    every layer after it (a U-Net's whole high-resolution decoder, most of its compute; the rest of a gan-critic)
    otherwise ran in the plain layout, which oneDNN and cuDNN convolve more slowly (benchmarks/README.md)."""
    module.register_forward_hook(_input_layout)
    return module


def holding(meta_model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """`meta_model` (built on the meta device) made real on the CPU holding `state`, without the random
    initialisation a real build spends its time on (a ResNet-34 U-Net's takes longer than reading its file); None
    where the model holds a tensor `state` cannot give (a non-persistent buffer, or a tensor attribute other than
    the weight that weight norm or spectral norm compute before every forward): only a real build gives those.

    torch's own pattern (`to_empty`, then a strict `load_state_dict`, which fails unless `state` gives every
    parameter and persistent buffer), plus the two reparametrisations' attributes recomputed from what was loaded,
    as a real build leaves them; spectral norm's without a power iteration, so `state` stays exactly the file's."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if any(name not in state for name, _ in meta_model.named_buffers()):
        return None
    computed: list[tuple[nn.Module, Any]] = []
    for module in meta_model.modules():
        norms = {h.name: h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))}
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                if key not in norms:
                    return None
                computed.append((module, norms[key]))
    model = meta_model.to_empty(device="cpu")
    model.load_state_dict(state)
    with torch.no_grad():
        for module, norm in computed:
            weight = (norm.compute_weight(module, do_power_iteration=False) if isinstance(norm, SpectralNorm)
                      else norm.compute_weight(module))
            setattr(module, norm.name, weight)
    return model


def held_or_built(probe: nn.Module, state: dict[str, torch.Tensor], build: Callable[[], nn.Module]) -> nn.Module:
    """`probe` (built on the meta device) made real holding `state` (`holding`), or, for a model only a real build
    makes whole, `build()` loaded strictly with `state`; either way no random numbers are drawn."""
    model = holding(probe, state)
    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = build()
        model.load_state_dict(state)
    return model


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, CPU allocator, MPS, numpy's MemoryError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# The fastai course's batch sizes (lesson 7's super-resolution notebook): 32 crops of 128 px, 12 of 256 px.
COURSE_BATCH = {128: 32, 256: 12}


def course_batch(size: int) -> int:
    """The course's batch for `size` px crops (32 at 128 px, 12 at 256 px); other sizes the batch holding as many
    pixels as the course's 128 px one (at least 1): 128 at 64 px, 2 at 512 px."""
    if size in COURSE_BATCH:
        return COURSE_BATCH[size]
    return max(1, round(COURSE_BATCH[128] * (128 / size) ** 2))


def largest_batch(step: Callable[[int], None], start: int, ceiling: int = 4096) -> int:
    """The largest batch `step(bs)` runs without running out of memory: from `start`, doubled while it fits (up to
    `ceiling`), halved while it does not, then bisected between the largest that fitted and the smallest that did
    not — a few probes, each one training step. ConfigError when not even a batch of 1 fits. An error other than
    out-of-memory is raised as it is."""

    def fits(bs: int) -> bool:
        try:
            step(bs)
        except Exception as exc:
            if not is_oom(exc):
                raise
            return False
        return True

    bs = max(1, min(start, ceiling))
    if fits(bs):
        good, bad = bs, None
        while bad is None and good < ceiling:
            bs = min(good * 2, ceiling)
            good, bad = (bs, None) if fits(bs) else (good, bs)
        if bad is None:
            return good
    else:
        bad = bs
        while True:
            if bad == 1:
                raise ConfigError("not even a batch of 1 fits in the device's memory; use smaller crops (--size)")
            bs = bad // 2
            if fits(bs):
                good = bs
                break
            bad = bs
    while bad - good > max(1, good // 16):  # to within 1/16 of the answer: each probe is a training step
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


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
