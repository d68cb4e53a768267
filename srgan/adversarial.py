"""Adversarial losses for the GAN phase, one registry: `bce`, `lsgan`, `hinge`, `wgan-gp`.

Each loss is an `AdversarialLoss` with two halves, both on the critic's raw outputs (logits, any shape
(N, ...): patch and per-pixel outputs are averaged):

- `critic(real_pred, fake_pred)`: what the critic minimises;
- `generator(fake_pred)`: the adversarial term the generator minimises (weighted and added to the content loss
  by the GAN loop).

`bce` and `lsgan` average the real and fake halves, as fastai's `gan_loss_from_func` does, so the course's
adaptive-switching threshold (critic loss < 0.65) means the same thing here. `hinge` and `wgan-gp` use their
usual sums. fastai offers WGAN only with weight clipping; the gradient penalty (Gulrajani et al. 2017) is
written here: `gradient_penalty`, added to the critic's loss by `wgan-gp` (`needs_images` tells the loop to pass
the real and fake images).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crappify.errors import ConfigError
from crappify.registry import Registry

ADVERSARIAL: Registry[type[AdversarialLoss]] = Registry("adversarial loss")


class AdversarialLoss:
    """Base class: a critic loss and a generator loss on critic logits (computed in float32)."""

    needs_images = False  # True when the critic loss also needs the images (gradient penalty)

    def critic(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        raise NotImplementedError

    def generator(self, fake_pred: Tensor) -> Tensor:
        raise NotImplementedError


@ADVERSARIAL.register("bce")
class BCELoss(AdversarialLoss):
    """Binary cross-entropy on logits (the fastai course's GAN loss): real → 1, fake → 0."""

    def critic(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        real, fake = real_pred.float(), fake_pred.float()
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))) / 2

    def generator(self, fake_pred: Tensor) -> Tensor:
        fake = fake_pred.float()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


@ADVERSARIAL.register("lsgan")
class LSGANLoss(AdversarialLoss):
    """Least squares (Mao et al. 2017; the common SRGAN PyTorch port's MSE): real → 1, fake → 0."""

    def critic(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        real, fake = real_pred.float(), fake_pred.float()
        return (F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))) / 2

    def generator(self, fake_pred: Tensor) -> Tensor:
        fake = fake_pred.float()
        return F.mse_loss(fake, torch.ones_like(fake))


@ADVERSARIAL.register("hinge")
class HingeLoss(AdversarialLoss):
    """Hinge loss (as in SAGAN / BigGAN): critic E[relu(1 - D(real))] + E[relu(1 + D(fake))], generator -E[D(fake)]."""

    def critic(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        return F.relu(1 - real_pred.float()).mean() + F.relu(1 + fake_pred.float()).mean()

    def generator(self, fake_pred: Tensor) -> Tensor:
        return -fake_pred.float().mean()


@ADVERSARIAL.register("wgan-gp")
class WGANGPLoss(AdversarialLoss):
    """Wasserstein loss, critic E[D(fake)] - E[D(real)] + gp_weight · gradient penalty; generator -E[D(fake)]."""

    needs_images = True

    def __init__(self, gp_weight: float = 10.0) -> None:
        self.gp_weight = gp_weight

    def critic(self, real_pred: Tensor, fake_pred: Tensor) -> Tensor:
        return fake_pred.float().mean() - real_pred.float().mean()

    def generator(self, fake_pred: Tensor) -> Tensor:
        return -fake_pred.float().mean()

    def penalty(self, critic: nn.Module, real: Tensor, fake: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """gp_weight × the gradient penalty (see `gradient_penalty`)."""
        return self.gp_weight * gradient_penalty(critic, real, fake, generator=generator)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
    """E[(‖∇D(x̂)‖₂ - 1)²] at x̂ = ε·real + (1-ε)·fake, ε ~ U(0, 1) per sample (WGAN-GP; not in fastai).

    The critic's gradient with respect to its input is taken with `create_graph=True`, so the penalty itself
    backpropagates into the critic. `generator` draws ε without touching global random state. The penalty's
    critic pass runs in float32 with autocast off, whatever the precision of the rest of the step: in fp16 the
    double backward overflows at the GradScaler's scales (measured: NaN at the first critic step on an H100).
    """
    n = real.shape[0]
    eps = torch.rand(n, 1, 1, 1, generator=generator, device="cpu" if generator is None else generator.device)
    with torch.autocast(real.device.type, enabled=False):
        eps = eps.to(device=real.device, dtype=torch.float32)
        mixed = (eps * real.detach().float() + (1 - eps) * fake.detach().float()).requires_grad_(True)
        out = critic(mixed)
        (grad,) = torch.autograd.grad(out.float().sum(), mixed, create_graph=True)
        norm = grad.float().flatten(1).norm(2, dim=1)
        return ((norm - 1) ** 2).mean()


def build_adversarial(name: str, gp_weight: float = 10.0) -> AdversarialLoss:
    """The adversarial loss `name` (a ConfigError lists the valid names)."""
    cls = ADVERSARIAL.get(name)
    if cls is WGANGPLoss:
        if gp_weight < 0:
            raise ConfigError(f"gp_weight must be >= 0, got {gp_weight}")
        return WGANGPLoss(gp_weight)
    return cls()


AdversarialName = ADVERSARIAL.name_type()
"""A config field naming an adversarial loss, checked against `ADVERSARIAL`."""
