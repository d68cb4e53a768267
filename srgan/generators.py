"""Generator models by name: fastai U-Nets on torchvision or timm encoders, the SRGAN paper's SRResNet,
ESRGAN's RRDBNet and Real-ESRGAN's compact SRVGGNet.

`build_generator(arch, ...)` is the one entry point. Every model it returns carries `crappify_spec`, a
JSON-serialisable dict (arch, scale, img_size, resolved options) from which `build_generator` rebuilds the
same architecture with `pretrained=False`, so a saved generator file needs only its weights and that spec.

fastai and timm are imported inside the builders: importing this module stays cheap for commands that
never build a network.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crappify.errors import ConfigError, brief
from crappify.registry import Registry
from srgan.normalize import IMAGENET_STATS
from srgan.runtime import held_or_built, keep_input_layout
from srgan.upsample import BicubicUpsample, resize_image
from srgan.weights import WeightsError, read_state_dict, timm_pretrained_file, torchvision_state_dict

Builder = Callable[..., nn.Module]

GENERATORS: Registry[Builder] = Registry("generator")
"""Generator builders by name; each is called as builder(scale=, img_size=, pretrained=, weights=, **options)."""

TIMM_PREFIX = "unet-timm:"
DEFAULT_ARCH = "unet-resnet34"
RESNET_DEPTHS = (18, 34, 50, 101, 152)

# The fastai course's generator (lesson 7): unet_learner(resnet34, blur=True, norm_type=Weight,
# self_attention=True, y_range=(-3, 3)) with DynamicUnet's own last_cross=True, bottle=False.
# `residual` (every generator): output = the input upsampled to the output size (srgan.upsample, the evaluation's
# bicubic) + a correction scaled by a zero-initialised gain, so an untrained generator is exactly the bicubic
# baseline. Off by default here, so files saved without the key load as they were trained; train-gen turns it on
# for generators trained from random weights. `gain_scale` (a residual U-Net's): the correction is
# gain_scale · gain · network(x). Adam moves every parameter by about the learning rate per step, whatever its
# scale, so a gain that must grow from 0 to a large value (to paint over an occluding rectangle the correction
# must be as large as the image) takes gain_scale times fewer steps to get there; the untrained generator is
# still exactly bicubic. 1 (the default) is how every earlier file was trained.
UNET_DEFAULTS: dict[str, Any] = {"blur": True, "blur_final": True, "self_attention": True, "norm_type": "weight",
                                 "y_range": (-3.0, 3.0), "last_cross": True, "bottle": False, "residual": False,
                                 "gain_scale": 1.0}
SRRESNET_DEFAULTS: dict[str, Any] = {"n_blocks": 16, "n_feats": 64, "residual": False}
# RRDBNet (ESRGAN, Wang et al. 2018; Real-ESRGAN's generator): 23 blocks, 64 features, growth 32 (16.7 M at x4).
# `normalize` (rrdb, compact): what the network's own layers see. "imagenet": the ImageNet-normalised tensors every
# stage passes (the default for files written before the option). "none": RGB in [0, 1] in and out, BasicSR's pixel
# convention; the model converts at its boundary (`PixelSpace`), so training, losses and inference are unchanged,
# while its state dict is exactly what BasicSR, Real-ESRGAN, spandrel and chaiNNer run on [0, 1] images
# (`srgan.basicsr`).
RRDB_DEFAULTS: dict[str, Any] = {"n_blocks": 23, "n_feats": 64, "growth": 32, "residual": False,
                                 "normalize": "imagenet"}
# compact: Real-ESRGAN's SRVGGNetCompact (realesr-animevideov3's size: 64 features, 16 convs, 0.6 M parameters at
# x4): every conv at LR resolution, PReLU, one pixel-shuffle, the nearest-upsampled input added. In BasicSR's pixel
# convention by default, so a compact model trained here loads in spandrel/chaiNNer as it is.
COMPACT_DEFAULTS: dict[str, Any] = {"n_feats": 64, "n_conv": 16, "normalize": "none"}
NORMALIZE_CHOICES = ("imagenet", "none")
# unet-small: a narrow ResNet encoder (timm's ResNet class, BasicBlocks) whose widths the fastai decoder follows,
# sized to train on a laptop CPU (benchmarks/README.md has its step time beside the ResNet U-Nets').
# Measured on the demo's data (x2 restore, 600 steps, MSE): its half-resolution first stage (no stem max-pool)
# and no full-resolution cross block give most of the gain of the full-resolution block at half the step time.
SMALL_DEFAULTS: dict[str, Any] = {**UNET_DEFAULTS, "width": 16, "depths": (1, 1, 1, 1), "stem_pool": False,
                                  "last_cross": False}
NORM_TYPES = ("weight", "spectral", "batch", None)
# Generators with no ImageNet weights anywhere: for them `pretrained` can only mean a --weights file.
NO_IMAGENET_WEIGHTS = ("srresnet", "unet-small", "rrdb", "compact")
UNET_MULTIPLE = 32  # a U-Net's encoder downsamples 32x: its input's sides must be multiples of this
# The most each option that sizes a network may ask for: far beyond the papers' models (SRResNet 16 blocks of 64,
# ESRGAN 23 of 64 with growth 32, ResNet-152's deepest stage 36 blocks), and small enough that a model file's spec
# is built (on the meta device, to be checked against its tensors) in a second or two, not minutes.
OPTION_MAX = {"n_blocks": 128, "n_feats": 512, "growth": 256, "width": 256, "n_conv": 128}
MAX_STAGE_DEPTH = 64


# --------------------------------------------------------------------------------------------------------
# entry point


def build_generator(arch: str = DEFAULT_ARCH, *, scale: int = 1, img_size: int = 128, pretrained: bool = False,
                    weights: str | Path | None = None, **options: Any) -> nn.Module:
    """Build generator `arch` (a GENERATORS name or `unet-timm:NAME`) with its options, defaults filled in.

    U-Nets keep the input size (the data layer resizes LR to HR size, as the fastai course does), so their
    `scale` must be 1; `srresnet` upsamples by `scale` (2, 4 or 8). `pretrained` loads ImageNet weights into
    a U-Net's encoder from the libraries' local caches or from the local file `weights`, failing at once
    with WeightsError when they are not there. The result's `crappify_spec` rebuilds it.
    """
    if not isinstance(arch, str):
        raise ConfigError(f"generator arch must be a string, got {arch!r}")
    if weights is not None and not pretrained:
        raise ConfigError("a weights file was given but pretrained weights are switched off (--no-pretrained)")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be a positive integer, got {scale!r}")
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"img_size must be a positive integer, got {img_size!r}")
    builder = _builder(arch)
    timm = arch.startswith(TIMM_PREFIX)  # a U-Net built on the fly, with the U-Nets' options
    resolved = _canonical_options(GENERATORS.resolve_options(arch, options, UNET_DEFAULTS if timm else None))
    model = builder(scale=scale, img_size=img_size, pretrained=pretrained, weights=weights, **resolved)
    model.crappify_spec = {"arch": arch, "scale": scale, "img_size": img_size, "options": resolved}
    return model.train()  # fastai leaves the encoder and decoder blocks in eval mode after its dummy passes


def clone_generator(model: nn.Module) -> nn.Module:
    """An independent copy of a generator built here (e.g. for an EMA of its weights), on the same device.

    `copy.deepcopy` fails on fastai U-Nets: the old-style weight norm and the skip-connection hooks hold
    non-leaf tensors once the model has run; rebuilding from `crappify_spec` and loading the state does not.
    """
    spec = model.crappify_spec
    state = model.state_dict()

    def build() -> nn.Module:
        return build_generator(spec["arch"], scale=spec["scale"], img_size=spec["img_size"], **spec["options"])

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # nothing allocated, no random numbers drawn
        probe = build()
    clone = held_or_built(probe, {k: v.to("cpu") for k, v in state.items()}, build)
    param = next(model.parameters(), None)
    if param is not None:
        clone.to(device=param.device, dtype=param.dtype)
    return clone.train(model.training)


def has_option(arch: str, key: str) -> bool:
    """Whether generator `arch` takes option `key` (every U-Net takes the U-Nets' options)."""
    if str(arch).startswith(TIMM_PREFIX):
        return key in UNET_DEFAULTS
    return arch in GENERATORS and key in GENERATORS.options(arch)


def is_unet_arch(arch: str) -> bool:
    """Whether the generator named `arch` is a U-Net: the one test of it, by name (`is_unet` asks a model)."""
    return str(arch).startswith("unet")


def is_unet(model: nn.Module) -> bool:
    """Whether a generator built here is a U-Net, the input contract with it: it keeps the size (`model_scale`
    1), so it takes the LR resized up to the output size, bicubic (`srgan.upsample`, the evaluation's baseline),
    where a generator that upsamples takes the LR as it is. `model_input` applies it to a whole image;
    `srgan.inference.TiledInference` tile by tile (`input_scale`)."""
    return is_unet_arch(getattr(model, "crappify_spec", {}).get("arch", ""))


def model_scale(model: nn.Module) -> int:
    """Output size / input size of a generator built here (1 for U-Nets)."""
    return 1 if is_unet(model) else int(getattr(model, "crappify_spec", {}).get("scale", 1))


def model_multiple(model: nn.Module) -> int:
    """What the input's height and width must be a multiple of (32 for U-Nets, 1 otherwise)."""
    return UNET_MULTIPLE if is_unet(model) else 1


def model_input(lr: np.ndarray, out_size: tuple[int, int] | None, model: nn.Module | bool) -> np.ndarray:
    """The input a generator gets for the HWC uint8 image `lr` when its output is to be `out_size` (width,
    height): `lr` resized to `out_size` by `srgan.upsample.resize_image` when the model takes an upscaled input
    (a U-Net: `is_unet`), else `lr` itself. `model`: the generator, or that answer already known (the data
    layer knows only whether it feeds a U-Net). `out_size` None: `lr` as it is."""
    upscaled = model if isinstance(model, bool) else is_unet(model)
    if upscaled and out_size is not None and (lr.shape[1], lr.shape[0]) != tuple(out_size):
        return resize_image(lr, tuple(out_size))
    return lr


def generator_names() -> list[str]:
    """Registered generator names plus the `unet-timm:NAME` form (for help texts and error messages)."""
    return [*GENERATORS.names(), f"{TIMM_PREFIX}<timm model name>"]


def _builder(arch: str) -> Builder:
    """The builder for `arch`: a registered name, or a U-Net on the timm model named after the prefix."""
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        _check_timm_name(name)
        return partial(_build_timm_unet, name)
    if arch not in GENERATORS:
        raise ConfigError(f"unknown generator {arch!r}; valid: {', '.join(generator_names())}")
    return GENERATORS.get(arch)


# --------------------------------------------------------------------------------------------------------
# U-Nets (fastai DynamicUnet)


def _check_unet_args(arch: str, scale: int, img_size: int) -> None:
    if scale != 1:
        raise ConfigError(f"{arch} keeps the input size (the low-resolution image is resized to the target size "
                          f"first), so scale must be 1, got {scale}; use srresnet to upsample inside the model")
    if img_size < 32:
        raise ConfigError(f"img_size must be at least 32 for a U-Net (its encoder downsamples 32x), got {img_size}")


def _canonical_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options checked and in one JSON form (norm_type lower-case or None, y_range [low, high] floats or None).

    Checked here, before anything is built, so a bad value fails at once.
    """
    out = dict(options)
    for key in ("blur", "blur_final", "self_attention", "last_cross", "bottle", "residual", "stem_pool"):
        if key in out and not isinstance(out[key], bool):
            raise ConfigError(f"U-Net option {key} must be true or false, got {out[key]!r}")
    for key, most in OPTION_MAX.items():
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or not 1 <= out[key] <= most):
            raise ConfigError(f"generator option {key} must be an integer in 1..{most}, got {brief(out[key])}")
    if "depths" in out:
        value = out["depths"]
        if (not isinstance(value, (list, tuple)) or len(value) != 4
                or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_STAGE_DEPTH for v in value)):
            raise ConfigError(f"unet-small option depths must be four integers in 1..{MAX_STAGE_DEPTH} (blocks per "
                              f"stage), got {brief(value)}")
        out["depths"] = [int(v) for v in value]
    if "norm_type" in out:
        value = out["norm_type"]
        key = None if value is None or (isinstance(value, str) and value.lower() == "none") else value
        key = key.lower() if isinstance(key, str) else key
        if key not in NORM_TYPES:
            raise ConfigError(f"norm_type must be one of weight, spectral, batch or none; got {value!r}")
        out["norm_type"] = key
    if "normalize" in out:
        value = out["normalize"]
        if value not in NORMALIZE_CHOICES:
            raise ConfigError(f"generator option normalize must be imagenet or none (RGB in [0, 1], BasicSR's "
                              f"convention), got {brief(value)}")
    if "gain_scale" in out:
        value = out["gain_scale"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
            raise ConfigError(f"U-Net option gain_scale must be a number in (0, 1000], got {value!r}")
        out["gain_scale"] = float(value)
    if out.get("y_range") is not None:
        value = out["y_range"]
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"y_range must be null or two numbers [low, high], got {value!r}") from None
        if not low < high:
            raise ConfigError(f"y_range must have low < high, got {value!r}")
        out["y_range"] = [low, high]
    return out


def _norm_type(name: str | None) -> Any:
    """fastai's NormType for 'weight' / 'spectral' / 'batch' / None."""
    from fastai.layers import NormType

    return {"weight": NormType.Weight, "spectral": NormType.Spectral, "batch": NormType.Batch, None: None}[name]


class ResidualOut(nn.Module):
    """Last layer of a residual U-Net: the U-Net's input (already resized to the output size) plus its correction
    times a per-channel gain that starts at zero, limited to `y_range`. Inside fastai's SequentialEx every layer
    sees the model's input as `x.orig` (fastai's MergeLayer reads it the same way)."""

    def __init__(self, y_range: list[float] | None, gain_scale: float = 1.0) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.y_range = tuple(y_range) if y_range is not None else None
        self.gain_scale = gain_scale  # see UNET_DEFAULTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.gain if self.gain_scale == 1.0 else self.gain * self.gain_scale
        out = x.orig.float() + gain * x
        return out.clamp(*self.y_range) if self.y_range is not None else out


def _dynamic_unet(encoder: nn.Sequential, *, img_size: int, blur: bool, blur_final: bool, self_attention: bool,
                  norm_type: str | None, y_range: list[float] | None, last_cross: bool, bottle: bool,
                  residual: bool = False, gain_scale: float = 1.0) -> nn.Module:
    """fastai's DynamicUnet on `encoder` with 3 output channels, tidied for use outside a fastai Learner."""
    from fastai.layers import ConvLayer, PixelShuffle_ICNR, SelfAttention, ToTensorBase, icnr_init
    from fastai.vision.models.unet import DynamicUnet

    with warnings.catch_warnings():  # fastai's ConvLayer uses the deprecated torch.nn.utils.weight_norm
        warnings.filterwarnings("ignore", message=r".*weight_norm.*deprecated", category=FutureWarning)
        unet = DynamicUnet(encoder, n_out=3, img_size=(img_size, img_size), blur=blur, blur_final=blur_final,
                           self_attention=self_attention, y_range=None if residual else y_range,
                           last_cross=last_cross,
                           bottle=bottle, norm_type=_norm_type(norm_type))
        if last_cross and bottle:
            # fastai 2.8 (vision/models/unet.py, DynamicUnet.__init__) makes the cross block
            # ResBlock(1, ni, ni//2) but still feeds it to ConvLayer(ni, n_out): the first forward fails.
            # The final 1x1 conv takes the block's ni//2 channels instead.
            last = max(i for i, layer in enumerate(unet.layers) if isinstance(layer, ConvLayer))
            unet.layers[last] = ConvLayer(unet.layers[last][0].in_channels // 2, 3, ks=1, act_cls=None,
                                          norm_type=_norm_type(norm_type))
    # The last layer only casts the output to fastai's TensorBase, whose __torch_function__ then wraps every op
    # downstream (losses, metrics); a plain tensor is what the rest of srgan expects. No parameters change. A
    # residual U-Net puts its skip there instead (a new `gain` parameter; every other key stays where it was).
    if isinstance(unet.layers[-1], ToTensorBase):
        unet.layers[-1] = ResidualOut(y_range, gain_scale) if residual else nn.Identity()
    elif residual:
        unet.layers.append(ResidualOut(y_range, gain_scale))
    # PixelShuffle_ICNR writes the ICNR init into `conv.weight`, which spectral norm recomputes from
    # `weight_orig` at the next forward, so with norm_type="spectral" the init was lost: put it where it lasts.
    for module in unet.modules():
        if isinstance(module, PixelShuffle_ICNR) and hasattr(module[0][0], "weight_orig"):
            with torch.no_grad():
                module[0][0].weight_orig.copy_(icnr_init(module[0][0].weight_orig))
        if isinstance(module, PixelShuffle_ICNR):  # the blur's pad, compile-safe (no parameters: same keys)
            for i, layer in enumerate(module):
                if type(layer) is nn.ReplicationPad2d:
                    module[i] = BlurPad(layer.padding)
        if isinstance(module, SelfAttention):  # the decoder after it stays channels-last when its input is
            keep_input_layout(module)
    return unet


class BlurPad(nn.ReplicationPad2d):
    """fastai's blur pad (`ReplicationPad2d((1, 0, 1, 0))` before the 2x2 average pool of `PixelShuffle_ICNR`):
    the same op when run eagerly; under torch.compile the first row and column are repeated by concatenation
    instead — the same pixels — because inductor (torch 2.14, CPU) expects contiguous strides from
    `replication_pad2d_backward` where the kernel returns channels-last ones, and the first backward fails
    (`assert_size_stride ... Error in op: torch.ops.aten.replication_pad2d_backward`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() or tuple(self.padding) != (1, 0, 1, 0):
            return super().forward(x)
        x = torch.cat([x[..., :1, :], x], dim=-2)
        return torch.cat([x[..., :1], x], dim=-1)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, turning a mismatch into a one-line WeightsError."""
    result = None
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise WeightsError(f"weights from {source} do not fit: {lines[0] if lines else str(exc).splitlines()[0]}"
                           ) from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"weights from {source} do not fit: {len(result.missing_keys)} missing keys "
                           f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected "
                           f"{result.unexpected_keys[:3]}")


def _resnet_body(depth: int, pretrained: bool, weights: str | Path | None) -> nn.Sequential:
    """A torchvision ResNet cut before its pooling head (fastai's create_body), ImageNet weights if asked."""
    import torchvision

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if pretrained:  # into the whole torchvision model, before the cut, exactly as the cache/file holds it
        name = f"ResNet{depth}_Weights.IMAGENET1K_V1"
        _load_strict(model, torchvision_state_dict(name, local=weights), str(weights) if weights else name)
    from fastai.vision.learner import create_body  # after the weights: a missing file fails before this slow import

    return create_body(model, n_in=3, pretrained=pretrained, cut=-2)  # drop avgpool + fc, as fastai's model_meta


def _build_resnet_unet(depth: int, *, scale: int, img_size: int, pretrained: bool, weights: str | Path | None,
                       **options: Any) -> nn.Module:
    """fastai DynamicUnet on a torchvision ResNet-`depth` encoder (the fastai course's generator for 34)."""
    _check_unet_args(f"unet-resnet{depth}", scale, img_size)
    return _dynamic_unet(_resnet_body(depth, pretrained, weights), img_size=img_size, **options)


for _depth in RESNET_DEPTHS:
    GENERATORS.register(f"unet-resnet{_depth}", options=UNET_DEFAULTS)(partial(_build_resnet_unet, _depth))


def _check_timm_name(name: str) -> None:
    """ConfigError unless `name` is a timm model name (tags like `.a1_in1k` allowed)."""
    import timm

    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown timm model {name!r} in {TIMM_PREFIX}{name}: a timm model name is expected "
                      f"(one of timm.list_models(), e.g. resnet34, convnext_tiny, efficientnet_b0){hint}")


def _timm_body(name: str, img_size: int, pretrained: bool, weights: str | Path | None) -> nn.Sequential:
    """The stages of timm model `name` as an nn.Sequential whose children DynamicUnet can hook.

    fastai's TimmBody (fastai/vision/learner.py) runs `forward_features` as one opaque module, which
    DynamicUnet can neither index nor hook. timm's FeatureListNet (the `features_only` extractor) instead
    re-assembles a model from its child modules in execution order, cut after the last `feature_info` stage;
    laid out as an nn.Sequential, the stride changes fall between children as in fastai's cut ResNets. It is
    built here from the whole model (not `create_model(features_only=True)`, which gives some families, such
    as EfficientNet, their own non-sequential extractor), nesting one level if the stages sit in a Sequential.
    """
    import timm
    from timm.models import FeatureListNet

    overlay = None
    if pretrained:
        path = Path(weights) if weights is not None else timm_pretrained_file(name)
        overlay = {"state_dict": read_state_dict(path)}
    try:
        model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay)
    except RuntimeError as exc:
        if pretrained:
            raise WeightsError(f"weights from {path} do not fit timm model {name!r}: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        raise
    unusable = ConfigError(f"timm model {name!r} cannot be a U-Net encoder: its stages are not a plain sequence of "
                           "NCHW feature maps (use a convolutional model such as a resnet, convnext or efficientnet)")
    if getattr(model, "output_fmt", "NCHW") not in ("NCHW", None) or not getattr(model, "feature_info", None):
        raise unusable
    out_indices = tuple(range(len(model.feature_info)))
    features = None
    for flatten in (False, True):
        try:
            features = FeatureListNet(model, out_indices=out_indices, flatten_sequential=flatten)
            break
        except AssertionError:  # the stages are not direct children: look one Sequential deeper
            continue
    if features is None:
        raise unusable
    encoder = nn.Sequential(OrderedDict(features.items()))
    # Check that running the children in order really gives each stage's feature map (a model whose
    # forward_features does more than call its children in turn would not).
    stages = [encoder.get_submodule(n) for n in features.return_layers]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in stages]
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, 3, img_size, img_size))
    except Exception as exc:  # e.g. attention windows that need another input size
        raise ConfigError(f"timm model {name!r} does not run as a U-Net encoder at img_size {img_size}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    finally:
        for hook in hooks:
            hook.remove()
    channels = [info["num_chs"] for info in model.feature_info]
    if [out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 4 else None for out in seen] != channels:
        raise unusable
    return encoder


def _build_timm_unet(name: str, *, scale: int, img_size: int, pretrained: bool, weights: str | Path | None,
                     **options: Any) -> nn.Module:
    """fastai DynamicUnet on the stages of timm model `name`."""
    _check_unet_args(f"{TIMM_PREFIX}{name}", scale, img_size)
    encoder = _timm_body(name, img_size, pretrained, weights)
    try:
        return _dynamic_unet(encoder, img_size=img_size, **options)
    except ConfigError:
        raise
    except (RuntimeError, AssertionError, ValueError) as exc:  # e.g. window sizes that need a fixed input size
        raise ConfigError(f"timm model {name!r} does not work as a U-Net encoder at img_size {img_size}: "
                          f"{str(exc).strip().splitlines()[0]}") from None


def _small_body(width: int, depths: list[int], stem_pool: bool) -> nn.Sequential:
    """A narrow ResNet (timm's ResNet class: BasicBlocks, widths width·(1, 2, 4, 8), stem of `width`) cut before
    its pooling head, as create_body cuts torchvision's: the same strides as ResNet-18/34 (32x in all)."""
    from timm.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, tuple(depths), channels=tuple(width * m for m in (1, 2, 4, 8)), stem_width=width,
                 num_classes=0, global_pool="")
    names = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if not stem_pool:  # the first stage stays at half resolution (the LR's own for x2 data): 16x in all
        names = tuple(n for n in names if n != "maxpool")
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


@GENERATORS.register("unet-small", options=SMALL_DEFAULTS)
def _build_small_unet(*, scale: int, img_size: int, pretrained: bool, weights: str | Path | None, width: int,
                      depths: list[int], stem_pool: bool, **options: Any) -> nn.Module:
    """fastai DynamicUnet on a narrow ResNet encoder, from random weights (no ImageNet weights exist for it;
    `weights` may hold a trained unet-small). The decoder's widths follow the encoder's, so it stays small."""
    _check_unet_args("unet-small", scale, img_size)
    model = _dynamic_unet(_small_body(width, depths, stem_pool), img_size=img_size, **options)
    if pretrained and weights is not None:
        _load_strict(model, read_state_dict(weights), str(weights))
    return model



# --------------------------------------------------------------------------------------------------------
# SRResNet (Ledig et al., 2017)


class _ResidualBlock(nn.Module):
    """3x3 conv-BN-PReLU-conv-BN with an identity skip."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False), nn.BatchNorm2d(n_feats), nn.PReLU(),
            nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False), nn.BatchNorm2d(n_feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """The SRGAN paper's generator: residual trunk at low resolution, then x2 sub-pixel stages up to `scale`.

    The output is linear (no tanh): targets are ImageNet-normalised, not in [-1, 1].
    """

    def __init__(self, scale: int = 4, n_blocks: int = 16, n_feats: int = 64, residual: bool = False) -> None:
        from fastai.layers import icnr_init

        super().__init__()
        if scale not in (2, 4, 8):
            raise ConfigError(f"srresnet upsamples by 2, 4 or 8 (x2 sub-pixel stages), got scale {scale}")

        self.head = nn.Sequential(nn.Conv2d(3, n_feats, 9, padding=4), nn.PReLU())
        self.body = nn.Sequential(*(_ResidualBlock(n_feats) for _ in range(n_blocks)))
        self.body_tail = nn.Sequential(nn.Conv2d(n_feats, n_feats, 3, padding=1, bias=False), nn.BatchNorm2d(n_feats))
        stages = []
        for _ in range(int(math.log2(scale))):
            conv = nn.Conv2d(n_feats, n_feats * 4, 3, padding=1)
            with torch.no_grad():  # ICNR: every sub-pixel starts with the same kernel, so no checkerboard at init
                conv.weight.copy_(icnr_init(conv.weight, scale=2))
                conv.bias.zero_()
            stages.append(nn.Sequential(conv, nn.PixelShuffle(2), nn.PReLU()))
        self.upsample = nn.Sequential(*stages)
        self.tail = nn.Conv2d(n_feats, 3, 9, padding=4)
        # residual: bicubic(x) + gain · network(x), the gain zero at first (see UNET_DEFAULTS)
        self.skip = BicubicUpsample(scale) if residual else None
        self.gain = nn.Parameter(torch.zeros(1, 3, 1, 1)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        out = self.tail(self.upsample(h + self.body_tail(self.body(h))))
        return out if self.skip is None else self.skip(x) + self.gain * out


@GENERATORS.register("srresnet", options=SRRESNET_DEFAULTS)
def _build_srresnet(*, scale: int, img_size: int, pretrained: bool, weights: str | Path | None, n_blocks: int,
                    n_feats: int, residual: bool) -> nn.Module:
    """SRResNet upsampling by `scale`; no ImageNet weights exist for it, `weights` may hold a trained SRResNet."""
    model = SRResNet(scale=scale, n_blocks=n_blocks, n_feats=n_feats, residual=residual)
    if pretrained and weights is not None:
        _load_strict(model, read_state_dict(weights), str(weights))
    return model



# --------------------------------------------------------------------------------------------------------
# BasicSR's pixel convention


class PixelSpace(nn.Module):
    """A generator whose layers may work on RGB in [0, 1] (`normalize` "none") while it takes and returns the
    ImageNet-normalised tensors of every stage: `forward` converts at the boundary around `core`. The statistics
    are non-persistent buffers, so the state dict holds the layers' weights only (BasicSR's keys, `srgan.basicsr`).
    Not clamped: the pixel values are the network's, as in BasicSR, until the stage's denormalisation."""

    def _pixel_space(self, normalize: str) -> None:
        self.normalize = normalize
        if normalize == "none":
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET_STATS)
            self.register_buffer("io_mean", mean, persistent=False)
            self.register_buffer("io_std", std, persistent=False)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize != "none":
            return self.core(x)
        mean, std = self.io_mean.to(x.dtype), self.io_std.to(x.dtype)
        return (self.core(x * std + mean) - mean) / std


# --------------------------------------------------------------------------------------------------------
# RRDBNet (ESRGAN, Wang et al. 2018), written from the paper's description


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output (growth channels each), LeakyReLU
    0.2 between them; the result is scaled by 0.2 and added to the input (residual scaling, no BatchNorm)."""

    def __init__(self, n_feats: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(n_feats + i * growth, growth if i < 4 else n_feats, 3, padding=1)
                                   for i in range(5))
        self.act = nn.LeakyReLU(0.2, inplace=True)
        for conv in self.convs:  # ESRGAN's initialisation: Kaiming, scaled down so deep trunks start near identity
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.convs[-1](torch.cat(feats, 1))


class _RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, their result scaled by 0.2 and added to the input."""

    def __init__(self, n_feats: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_DenseBlock(n_feats, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBNet(PixelSpace):
    """ESRGAN's generator: conv, a trunk of RRDBs with a long skip, x2 stages of nearest-neighbour upsampling +
    conv + LeakyReLU, then two convs to RGB. Linear output (targets are ImageNet-normalised), no BatchNorm."""

    def __init__(self, scale: int = 4, n_blocks: int = 23, n_feats: int = 64, growth: int = 32,
                 residual: bool = False, normalize: str = "imagenet") -> None:
        super().__init__()
        self._pixel_space(normalize)
        if scale not in (2, 4):
            raise ConfigError(f"rrdb upsamples by 2 or 4 (x2 nearest-neighbour stages), got scale {scale}")
        self.head = nn.Conv2d(3, n_feats, 3, padding=1)
        self.body = nn.Sequential(*(_RRDB(n_feats, growth) for _ in range(n_blocks)))
        self.body_tail = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.up = nn.ModuleList(nn.Conv2d(n_feats, n_feats, 3, padding=1) for _ in range(int(math.log2(scale))))
        self.hr = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.tail = nn.Conv2d(n_feats, 3, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.skip = BicubicUpsample(scale) if residual else None  # as SRResNet's: bicubic + gain · network
        self.gain = nn.Parameter(torch.zeros(1, 3, 1, 1)) if residual else None

    def core(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        h = self.head(x)
        h = h + self.body_tail(self.body(h))
        for conv in self.up:
            h = self.act(conv(F.interpolate(h, scale_factor=2, mode="nearest")))
        out = self.tail(self.act(self.hr(h)))
        return out if self.skip is None else self.skip(x) + self.gain * out


@GENERATORS.register("rrdb", options=RRDB_DEFAULTS)
def _build_rrdb(*, scale: int, img_size: int, pretrained: bool, weights: str | Path | None, n_blocks: int,
                n_feats: int, growth: int, residual: bool, normalize: str) -> nn.Module:
    """RRDBNet upsampling by `scale`; no ImageNet weights exist for it, `weights` may hold a trained RRDBNet."""
    model = RRDBNet(scale=scale, n_blocks=n_blocks, n_feats=n_feats, growth=growth, residual=residual,
                    normalize=normalize)
    if pretrained and weights is not None:
        _load_strict(model, read_state_dict(weights), str(weights))
    return model


# --------------------------------------------------------------------------------------------------------
# Compact (Real-ESRGAN's SRVGGNetCompact, Wang et al. 2021), written from its description


class Compact(PixelSpace):
    """A plain VGG-style body at LR resolution: conv + PReLU, `n_conv` × (conv + PReLU), a conv to 3·scale² channels,
    one pixel-shuffle to the output size, plus the input upsampled by nearest neighbour (the network learns the
    residual). The layers are numbered as Real-ESRGAN numbers them (`body.0` … `body.{2·n_conv+2}`), so the state
    dict is its own."""

    def __init__(self, scale: int = 4, n_feats: int = 64, n_conv: int = 16, normalize: str = "none") -> None:
        super().__init__()
        if scale not in (1, 2, 3, 4):
            raise ConfigError(f"compact upsamples by 1, 2, 3 or 4 (one pixel-shuffle), got scale {scale}")
        self._pixel_space(normalize)
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, n_feats, 3, padding=1), nn.PReLU(n_feats)]
        for _ in range(n_conv):
            layers += [nn.Conv2d(n_feats, n_feats, 3, padding=1), nn.PReLU(n_feats)]
        layers.append(nn.Conv2d(n_feats, 3 * scale * scale, 3, padding=1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        out = x
        for layer in self.body:
            out = layer(out)
        base = x if self.scale == 1 else F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.upsampler(out) + base


@GENERATORS.register("compact", options=COMPACT_DEFAULTS)
def _build_compact(*, scale: int, img_size: int, pretrained: bool, weights: str | Path | None, n_feats: int,
                   n_conv: int, normalize: str) -> nn.Module:
    """Compact upsampling by `scale`; no ImageNet weights exist for it, `weights` may hold a trained one."""
    model = Compact(scale=scale, n_feats=n_feats, n_conv=n_conv, normalize=normalize)
    if pretrained and weights is not None:
        _load_strict(model, read_state_dict(weights), str(weights))
    return model

