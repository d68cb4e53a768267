"""srgan.losses: every registered loss, the feature loss against a fastai-style reference, frozen loss
networks, combining with weights, config errors, the pretrained-weights paths and autocast.

All on CPU with tiny inputs and random (pretrained=False) VGG weights, except the weights-path tests,
which save their own random torchvision weights.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from crappify.errors import ConfigError
from srgan.losses import (
    LOSSES,
    CombinedLoss,
    FeatureLoss,
    FrozenFeatures,
    VGG19ContentLoss,
    build_loss,
    gram_matrix,
    vgg_depth,
)
from srgan.weights import WeightsError

NETWORK_LOSSES = ("feature", "vgg19", "vgg")


def images(seed: int = 0, size: int = 32, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target): two different roughly ImageNet-normalised batches."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, 3, size, size, generator=g)
    pred = target + 0.5 * torch.randn(n, 3, size, size, generator=g)
    return pred, target


@pytest.fixture(scope="module")
def losses() -> dict[str, nn.Module]:
    """One instance of every registered loss, random VGG weights."""
    torch.manual_seed(0)
    return {name: LOSSES.get(name)(**({"pretrained": False} if name in NETWORK_LOSSES else {}))
            for name in LOSSES.names()}


@pytest.fixture(scope="module")
def vgg16_bn_file(tmp_path_factory) -> tuple[nn.Module, str]:
    """A random torchvision vgg16_bn (BN statistics made non-trivial) and a file holding its state dict."""
    torch.manual_seed(1)
    model = torchvision.models.vgg16_bn().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    path = tmp_path_factory.mktemp("weights") / "vgg16_bn_random.pth"
    # the whole model's state dict, less the 0.5 GB of classifier weights (one small classifier entry stays
    # to show that keys outside `.features` are ignored)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.") or k == "classifier.6.bias"}
    torch.save(state, path)
    return model, str(path)


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory) -> tuple[nn.Module, str]:
    """torchvision's VGG19 `.features` (random) and a file holding it as a whole-model state dict."""
    torch.manual_seed(2)
    features = make_layers(cfgs["E"], batch_norm=False).eval()
    path = tmp_path_factory.mktemp("weights") / "vgg19_random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return features, str(path)


# --------------------------------------------------------------------------------------------------
# Every registered loss


def test_registry_holds_the_losses():
    assert set(LOSSES.names()) >= {"l1", "mse", "feature", "vgg19", "tv"}


@pytest.mark.parametrize("name", LOSSES.names())
def test_value_and_gradient(losses, name):
    pred, target = images()
    pred.requires_grad_(True)
    value = losses[name](pred, target)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert torch.isfinite(value) and value.item() >= 0
    value.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_identical_images_give_zero(losses, name):
    pred, target = images(1)
    if name == "tv":
        assert losses[name](torch.full((2, 3, 32, 32), 0.7), target).item() == 0
        assert losses[name](pred, target).item() > 0
    else:
        assert abs(losses[name](target.clone(), target).item()) < 1e-6
        assert losses[name](pred, target).item() > 0


def test_pixel_and_tv_values():
    pred, target = images(2)
    assert torch.allclose(build_loss("l1")(pred, target), (pred - target).abs().mean())
    assert torch.allclose(build_loss("mse")(pred, target), ((pred - target) ** 2).mean())
    x = torch.zeros(1, 1, 4, 4)
    x[..., :, 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal neighbour pairs differ by 1
    assert torch.allclose(LOSSES.get("tv")()(x, x), torch.tensor(4 / 12))
    assert LOSSES.get("tv")()(torch.randn(1, 3, 1, 1), None).item() == 0  # a single pixel has no neighbours


# --------------------------------------------------------------------------------------------------
# Feature loss


def test_feature_loss_taps_the_relus_before_the_block_2_to_4_maxpools(losses):
    loss = losses["feature"]
    assert loss.layer_ids == (22, 32, 42) and loss.layer_weights == (5.0, 15.0, 2.0) and loss.gram_weight == 5e3
    full = make_layers(cfgs["D"], batch_norm=True)  # torchvision's vgg16_bn().features
    assert len(full) == vgg_depth("vgg16_bn")
    for i in loss.layer_ids:
        assert isinstance(full[i], nn.ReLU) and isinstance(full[i + 1], nn.MaxPool2d)
        assert isinstance(loss.net[i], nn.ReLU)
    assert len(loss.net) == 43  # truncated after the last tapped layer
    assert [type(m) for m in loss.net] == [type(m) for m in full[:43]]
    feats = loss.features(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 8, 8), (512, 4, 4), (512, 2, 2)]


def test_feature_loss_matches_a_fastai_style_reference(vgg16_bn_file):
    """The course's FeatureLoss written with forward hooks on torchvision's own vgg16_bn gives the same value."""
    model, path = vgg16_bn_file
    loss = FeatureLoss(pretrained=True, weights=path)
    assert torch.equal(loss.net[0].weight, model.features[0].weight)

    stored: list[torch.Tensor] = []
    hooks = [model.features[i].register_forward_hook(lambda m, i, o: stored.append(o)) for i in (22, 32, 42)]
    try:
        def feats(x):
            stored.clear()
            model.features(x)
            return [o.clone() for o in stored]

        pred, target = images(3)
        fi, fo = feats(pred), feats(target)
        expected = F.l1_loss(pred, target)
        for a, b, w in zip(fi, fo, (5.0, 15.0, 2.0), strict=True):
            expected = expected + w * F.l1_loss(a, b) + w**2 * 5e3 * F.l1_loss(gram_matrix(a), gram_matrix(b))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert torch.allclose(loss(pred, target), expected, rtol=1e-5, atol=1e-6)


def test_gram_matrix():
    x = torch.randn(2, 4, 3, 5)
    g = gram_matrix(x)
    assert g.shape == (2, 4, 4)
    f = x.reshape(2, 4, 15)
    assert torch.allclose(g[1], f[1] @ f[1].T / 60)
    assert torch.allclose(gram_matrix(x.to(memory_format=torch.channels_last)), g)


def test_gram_term_and_layer_weights_change_the_value(losses):
    base = losses["feature"]
    no_gram = FeatureLoss(pretrained=False, gram_weight=0)
    scaled = FeatureLoss(pretrained=False, layer_weights=[10.0, 15.0, 0.0])
    no_gram.net.load_state_dict(base.net.state_dict())
    scaled.net.load_state_dict(base.net.state_dict())
    pred, target = images(4)
    with torch.no_grad():
        full, without = base(pred, target), no_gram(pred, target)
        scaled(pred, target)
    assert not torch.allclose(full, without)
    gram = sum(v for k, v in base.terms.items() if k.startswith("gram_"))
    assert torch.allclose(full - without, gram, rtol=1e-4)
    assert set(no_gram.terms) == {"pixel", "feat_0", "feat_1", "feat_2"}
    assert torch.allclose(sum(base.terms.values()), full)
    # w scales the feature term, w² the gram term
    assert torch.allclose(scaled.terms["feat_0"], 2 * base.terms["feat_0"])
    assert torch.allclose(scaled.terms["gram_0"], 4 * base.terms["gram_0"])
    assert torch.allclose(scaled.terms["feat_1"], base.terms["feat_1"])
    assert scaled.terms["feat_2"].item() == 0 and scaled.terms["gram_2"].item() == 0


def test_feature_loss_custom_layers():
    loss = FeatureLoss(pretrained=False, layer_ids=[5, 12], layer_weights=[1.0, 1.0])
    assert len(loss.net) == 13
    pred, target = images(5)
    assert torch.isfinite(loss(pred, target))
    tapped_bn = FeatureLoss(pretrained=False, layer_ids=[4, 12], layer_weights=[1.0, 1.0])  # 4: a BN, then a ReLU
    assert not tapped_bn.net[5].inplace
    f, _ = tapped_bn.features(torch.randn(1, 3, 16, 16))
    assert (f < 0).any()  # still the BN output, not overwritten by the ReLU after it


# --------------------------------------------------------------------------------------------------
# VGG19 content loss


def test_vgg19_is_phi54_with_criterion_and_scale(vgg19_file):
    features, path = vgg19_file
    assert isinstance(features[34], nn.Conv2d) and isinstance(features[35], nn.ReLU)
    assert isinstance(features[36], nn.MaxPool2d)  # φ5,4: after the block-5 4th conv's ReLU, before the 5th pool
    mse = VGG19ContentLoss(pretrained=True, weights=path)
    assert len(mse.net) == 36 and torch.equal(mse.net[0].weight, features[0].weight)
    l1 = build_loss("vgg19", weights={"vgg19": path}, criterion="l1", feature_scale=1 / 12.75).parts["vgg19"]
    pred, target = images(6)
    with torch.no_grad():
        fi, fo = features[:36](pred.clone()), features[:36](target.clone())
        assert torch.allclose(mse(pred, target), F.mse_loss(fi, fo), rtol=1e-5)
        assert torch.allclose(l1(pred, target), F.l1_loss(fi, fo) / 12.75, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Frozen, eval-mode loss networks that belong to the loss only


@pytest.mark.parametrize("name", NETWORK_LOSSES)
def test_loss_network_frozen_and_always_in_eval(name):
    combined = build_loss(name, pretrained=False)
    loss = combined.parts[name]
    combined.train()
    loss.train(True)
    loss.net.train()
    assert isinstance(loss.net, FrozenFeatures)
    assert not any(m.training for m in loss.net.modules())
    assert not any(p.requires_grad for p in combined.parameters())
    assert [p for p in combined.parameters() if p.requires_grad] == []
    bn_before = {k: v.clone() for k, v in loss.net.state_dict().items()}
    pred, target = images(7)
    pred.requires_grad_(True)
    combined(pred, target).backward()
    assert all(torch.equal(bn_before[k], v) for k, v in loss.net.state_dict().items())  # running stats untouched
    assert all(p.grad is None for p in loss.net.parameters())


def test_generator_state_dict_never_holds_the_loss_network():
    generator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    keys = set(generator.state_dict())
    loss = build_loss({"feature": 1.0, "l1": 1.0}, pretrained=False)
    pred, target = images(8)
    opt = torch.optim.SGD(generator.parameters(), lr=1e-3)
    loss(generator(pred), target).backward()
    opt.step()
    assert set(generator.state_dict()) == keys
    assert any(k.startswith("parts.feature.net.") for k in loss.state_dict())


def test_device_dtype_and_copy(losses):
    loss = copy.deepcopy(losses["feature"])
    pred, target = images(9)
    loss.to(torch.float64)
    assert next(loss.parameters()).dtype == torch.float64
    value = loss(pred.double(), target.double())
    assert value.dtype == torch.float64 and torch.isfinite(value)
    loss(pred, target)  # float32 inputs: the network follows them
    assert next(loss.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# build_loss and CombinedLoss


def test_build_loss_combines_with_weights(losses):
    weights = {"l1": 1.0, "mse": 0.5, "tv": 1e-2, "feature": 2e-2}
    combined = build_loss(weights, pretrained=False)
    assert isinstance(combined, CombinedLoss) and combined.spec == weights and list(combined.parts) == list(weights)
    combined.parts["feature"].net.load_state_dict(losses["feature"].net.state_dict())
    pred, target = images(10)
    with torch.no_grad():
        total = combined(pred, target)
        separate = {name: losses[name](pred, target) for name in weights}
    assert set(combined.last) == set(weights)
    for name, value in separate.items():
        assert combined.last[name] == pytest.approx(value.item(), rel=1e-5)
    expected = sum(w * separate[name] for name, w in weights.items())
    assert torch.allclose(total, expected, rtol=1e-5)


def test_build_loss_single_name_and_options():
    single = build_loss("feature", pretrained=False, gram_weight=0.0, layer_weights=[20, 70, 10])
    assert single.spec == {"feature": 1.0}
    assert single.parts["feature"].gram_weight == 0 and single.parts["feature"].layer_weights == (20, 70, 10)
    both = build_loss({"feature": 1, "vgg19": 1}, pretrained=False, criterion="l1", feature={"gram_weight": 1.0})
    assert both.parts["vgg19"].criterion == "l1" and both.parts["feature"].gram_weight == 1.0


def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_loss("perceptual", pretrained=False)
    for name in LOSSES.names():
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="vgg19"):
        build_loss({"l1": 1.0, "nope": 1.0})


@pytest.mark.parametrize("spec, options", [
    ("l1", {"gram_weight": 1.0}),
    ("feature", {"bogus": 1}),
    ("feature", {"feature": {"criterion": "l1"}}),
    ("vgg19", {"criterion": "huber"}),
    ("feature", {"layer_weights": [1.0, 2.0]}),
    ("feature", {"layer_ids": [22, 99], "layer_weights": [1.0, 1.0]}),
    ("feature", {"gram_weight": -1.0}),
    ({"l1": -1.0}, {}),
    ({"l1": "x"}, {}),
    ({}, {}),
    (3, {}),
])
def test_bad_specs_and_options_are_config_errors(spec, options):
    with pytest.raises(ConfigError):
        build_loss(spec, pretrained=False, **options)


# --------------------------------------------------------------------------------------------------
# Pretrained weights


@pytest.mark.parametrize("name", NETWORK_LOSSES)
def test_pretrained_without_cache_fails_fast(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        build_loss({"l1": 1.0, name: 1.0}, pretrained=True)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "--no-pretrained" in message and str(tmp_path) in message and ".pth" in message


def test_weights_file_by_any_key(vgg16_bn_file):
    model, path = vgg16_bn_file
    for key in ("feature", "vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1"):
        loss = build_loss("feature", weights={key: path, "resnet34": "/elsewhere.pth"}).parts["feature"]
        assert torch.equal(loss.net[0].weight, model.features[0].weight)
        assert torch.equal(loss.net[41].running_var, model.features[41].running_var)


def test_weights_file_that_does_not_fit(vgg16_bn_file, tmp_path):
    _, path = vgg16_bn_file
    with pytest.raises(WeightsError, match="vgg19"):
        build_loss("vgg19", weights={"vgg19": path})
    with pytest.raises(WeightsError, match="not found"):
        build_loss("feature", weights={"feature": str(tmp_path / "missing.pth")})


# --------------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("name", LOSSES.names())
def test_bf16_autocast_gives_finite_float32(losses, name):
    pred, target = images(11, size=40)
    pred.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = losses[name](pred, target)
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(pred.grad).all()
    assert next(iter(losses[name].parameters()), torch.zeros(())).dtype == torch.float32  # weights unchanged


def test_bf16_autocast_combined_close_to_fp32(losses):
    combined = build_loss({"l1": 1.0, "feature": 1.0}, pretrained=False)
    combined.parts["feature"].net.load_state_dict(losses["feature"].net.state_dict())
    pred, target = images(12, size=40)
    with torch.no_grad():
        full = combined(pred, target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = combined(pred.bfloat16(), target)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(full.item(), rel=0.05)
