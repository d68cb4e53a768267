"""Critic (discriminator) models by name, for `train-critic` and `train-gan`.

`build_critic(arch, **options)` is the one entry point. Every critic it returns carries `crappify_spec`
({"arch", "options"}), from which `build_critic` rebuilds the same architecture, so a saved critic file
(`srgan.checkpoint.save_critic`) needs only its weights and that spec. All critics take ImageNet-normalised
(N, 3, H, W) images of any size the architecture allows and return logits (no sigmoid):

- `gan-critic`: fastai's `gan_critic` (spectral norm, LeakyReLU 0.2, self-attention, dropout), the fastai
  course's critic; a patch output flattened to (N, P).
- `srgan`: the SRGAN paper's discriminator: 8 3x3 convs, 64 → 512 channels, stride 2 on every second conv,
  BN after the first, LeakyReLU 0.2, then dense 1024 → LeakyReLU → dense 1; (N, 1). An adaptive average pool
  before the dense head (to `pool`² cells, 6 as for 96 px crops) lets it take any input size.
- `patch`: the same convolution stack as `srgan` with a patch head instead of the dense one (a 3x3 conv to one
  logit per cell at 1/2^n_blocks of the input, as in PyTorch-GAN's SRGAN and pix2pix's PatchGAN): every logit
  judges a local texture patch, which is what tells a sharp photo from a smooth restoration. No spectral norm,
  so it learns in a few hundred CPU steps where the spectral-norm critics stay at chance (benchmarks/README.md).
- `unet-sn`: a U-Net discriminator with spectral norm and a per-pixel output (N, 1, H, W), in the spirit of
  Real-ESRGAN's `UNetDiscriminatorSN`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crappify.errors import ConfigError, brief
from crappify.registry import Registry
from srgan.runtime import keep_input_layout

CriticBuilder = Callable[..., nn.Module]

CRITICS: Registry[CriticBuilder] = Registry("critic")
"""Critic builders by name; each is called with its options as keyword arguments."""

DEFAULT_CRITIC = "gan-critic"


def build_critic(arch: str = DEFAULT_CRITIC, **options: Any) -> nn.Module:
    """Build critic `arch` with its options (unknown options are a ConfigError); the result has `crappify_spec`."""
    builder = CRITICS.get(arch)  # unknown names fail here, listing the valid ones
    resolved = CRITICS.resolve_options(arch, options)
    for key, value in resolved.items():
        if key == "p":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"critic option p must be a dropout probability in [0, 1), got {brief(value)}")
            resolved[key] = float(value)
        elif key == "skip":
            if not isinstance(value, bool):
                raise ConfigError(f"critic option skip must be true or false, got {brief(value)}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"critic option {key} must be a positive integer, got {brief(value)}")
    model = builder(**resolved)
    model.crappify_spec = {"arch": arch, "options": resolved}
    return model.train()


def min_input_size(arch: str, **options: Any) -> int:
    """The smallest square input (px) critic `arch` accepts with these options (for `srgan`, which runs on any
    size thanks to padding and its adaptive pool, the size at which its features reach 1 px)."""
    opts = CRITICS.resolve_options(arch, options)
    if arch == "gan-critic":  # 1 + n_blocks stride-2 convs, then a 4x4 valid conv
        return 4 * 2 ** (1 + opts["n_blocks"])
    if arch in ("srgan", "patch"):
        return 2 ** opts["n_blocks"]
    return 8  # unet-sn: three stride-2 levels


@CRITICS.register("gan-critic")
def _gan_critic(*, nf: int = 128, n_blocks: int = 3, p: float = 0.15) -> nn.Module:
    """fastai's `gan_critic` as is, with its defaults (the course's critic)."""
    import warnings

    from fastai.layers import SelfAttention
    from fastai.vision.gan import gan_critic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        critic = _PlainOutput(gan_critic(n_channels=3, nf=nf, n_blocks=n_blocks, p=p))
    for module in critic.modules():
        if isinstance(module, SelfAttention):  # the layers after it stay channels-last when its input is
            keep_input_layout(module)
    return critic


class _PlainOutput(nn.Sequential):
    """Wraps a fastai model so its output is a plain tensor (fastai's Flatten keeps its TensorBase subclass,
    whose __torch_function__ would wrap every op downstream). The state-dict keys gain a `0.` prefix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.as_subclass(torch.Tensor) if type(out) is not torch.Tensor else out


def srgan_features(nf: int, n_blocks: int) -> tuple[nn.Sequential, int]:
    """The SRGAN discriminator's conv stack (fig. 4): per block a stride-1 conv (channels double after the
    first block) and a stride-2 conv, BN after every conv but the first, LeakyReLU 0.2; and its output width."""
    layers: list[nn.Module] = []
    ni = 3
    for i in range(n_blocks):
        nc = nf * 2 ** i
        for stride in (1, 2):
            layers.append(nn.Conv2d(ni, nc, 3, stride, 1, bias=not layers))
            if layers[1:]:  # BN after every conv but the first
                layers.append(nn.BatchNorm2d(nc))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ni = nc
    return nn.Sequential(*layers), ni


class SRGANDiscriminator(nn.Module):
    """The SRGAN paper's discriminator (Ledig et al. 2017, fig. 4); see the module docstring."""

    def __init__(self, nf: int = 64, n_blocks: int = 4, hidden: int = 1024, pool: int = 6) -> None:
        super().__init__()
        self.features, ni = srgan_features(nf, n_blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ni * pool * pool, hidden), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class PatchDiscriminator(nn.Module):
    """SRGAN's conv stack with a 3x3 conv to one logit per patch: (N, 1, ceil(H/2^n), ceil(W/2^n))."""

    def __init__(self, nf: int = 64, n_blocks: int = 4) -> None:
        super().__init__()
        self.features, ni = srgan_features(nf, n_blocks)
        self.head = nn.Conv2d(ni, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@CRITICS.register("srgan")
def _srgan_critic(*, nf: int = 64, n_blocks: int = 4, hidden: int = 1024, pool: int = 6) -> nn.Module:
    return SRGANDiscriminator(nf=nf, n_blocks=n_blocks, hidden=hidden, pool=pool)


class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral norm, per-pixel logits (after Real-ESRGAN; re-implemented here).

    Three stride-2 levels down (nf → 8nf), bilinear upsampling back with additive skips, two more convs and a
    1-channel output at the input's resolution. Upsampling goes to the skip's exact size, so odd sizes work.
    """

    def __init__(self, nf: int = 64, skip: bool = True) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        self.skip = skip
        self.conv0 = nn.Conv2d(3, nf, 3, 1, 1)
        self.down = nn.ModuleList([sn(nn.Conv2d(nf * 2 ** i, nf * 2 ** (i + 1), 4, 2, 1, bias=False))
                                   for i in range(3)])
        self.up = nn.ModuleList([sn(nn.Conv2d(nf * 2 ** (i + 1), nf * 2 ** i, 3, 1, 1, bias=False))
                                 for i in (2, 1, 0)])
        self.refine = nn.Sequential(sn(nn.Conv2d(nf, nf, 3, 1, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True),
                                    sn(nn.Conv2d(nf, nf, 3, 1, 1, bias=False)), nn.LeakyReLU(0.2, inplace=True),
                                    nn.Conv2d(nf, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [F.leaky_relu(self.conv0(x), 0.2)]
        for conv in self.down:
            feats.append(F.leaky_relu(conv(feats[-1]), 0.2))
        h = feats.pop()
        for conv in self.up:
            skip = feats.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = F.leaky_relu(conv(h), 0.2)
            if self.skip:
                h = h + skip
        return self.refine(h)


@CRITICS.register("patch")
def _patch_critic(*, nf: int = 64, n_blocks: int = 4) -> nn.Module:
    return PatchDiscriminator(nf=nf, n_blocks=n_blocks)


@CRITICS.register("unet-sn")
def _unet_sn(*, nf: int = 64, skip: bool = True) -> nn.Module:
    return UNetDiscriminatorSN(nf=nf, skip=skip)
