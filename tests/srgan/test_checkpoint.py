"""Rebuilding a model from its file (`srgan.checkpoint`, `srgan.runtime.holding`): built on the meta device and
made real holding the file's weights, with no random initialisation spent on them; exactly the saved model
(weight norm and spectral norm included), no random numbers drawn, and a real build where only one gives the
model whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srgan.checkpoint import load_critic, load_generator, save_critic, save_generator
from srgan.critics import build_critic
from srgan.generators import build_generator, clone_generator
from srgan.runtime import holding

GENERATORS = [("unet-small", {}), ("unet-small", {"norm_type": "spectral"}), ("unet-resnet18", {"residual": True}),
              ("srresnet", {"scale": 2, "n_blocks": 2}), ("rrdb", {"scale": 4, "n_blocks": 1}),
              ("compact", {"scale": 2, "n_conv": 2})]  # compact: non-persistent buffers, built for real


def _trained_a_little(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Weights that are not a fresh build's: a step of SGD, and one train-mode pass (spectral norm's u, v move)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).float().mean().backward()
    opt.step()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("arch,options", GENERATORS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_loaded_generator_is_the_saved_one_and_draws_no_random_numbers(arch, options, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    model = _trained_a_little(build_generator(arch, img_size=32, **options), x)
    path = tmp_path / "g.safetensors"
    save_generator(model, path, data_scale=options.get("scale", 2))
    rng = torch.get_rng_state()
    loaded = load_generator(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing, whichever way it builds
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    rng = torch.get_rng_state()
    clone = clone_generator(model).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("arch", ["gan-critic", "unet-sn", "patch", "srgan"])
def test_a_loaded_critic_is_the_saved_one(arch, tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    model = _trained_a_little(build_critic(arch), x)
    save_critic(model, tmp_path / "c.safetensors")
    loaded = load_critic(tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_no_random_initialisation_is_spent_on_weights_the_file_replaces(tmp_path, monkeypatch):
    save_generator(build_generator("unet-small", img_size=32), tmp_path / "g.safetensors", data_scale=2)
    real = []
    kaiming = nn.init.kaiming_normal_

    def counting(tensor, *args, **kwargs):  # timm's ResNet initialises its convolutions with this
        if not tensor.is_meta:
            real.append(tuple(tensor.shape))
        return kaiming(tensor, *args, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_normal_", counting)
    model = build_generator("unet-small", img_size=32)
    assert real  # a real build does initialise (so the check below can fail)
    real.clear()
    load_generator(tmp_path / "g.safetensors")
    clone_generator(model)
    assert real == []


class _WithAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale = torch.ones(3)  # a tensor the state dict does not hold


class _WithNonPersistentBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.full((3,), 0.5), persistent=False)


@pytest.mark.parametrize("cls", [_WithAttribute, _WithNonPersistentBuffer])
def test_a_model_holding_what_its_state_cannot_give_is_left_to_a_real_build(cls):
    with torch.device("meta"):
        probe = cls()
    assert holding(probe, cls().state_dict()) is None


def test_holding_refuses_a_state_without_every_tensor():
    with torch.device("meta"):
        probe = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    state = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).state_dict()
    del state["1.weight"]
    with pytest.raises(RuntimeError, match=r"1\.weight"):
        holding(probe, state)
