"""Generator models: shapes per arch and scale, U-Net options, rebuild from the spec, pretrained weights, ICNR."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import convs_without_channels_last
from torch import nn

from crappify.errors import ConfigError
from srgan.generators import GENERATORS, build_generator, clone_generator
from srgan.normalize import Normalizer
from srgan.upsample import resize_image
from srgan.weights import WeightsError

BIG_UNETS = ["unet-resnet50", "unet-resnet101", "unet-resnet152"]  # 340-380M parameters: 10-30 s each to build


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def unet18() -> nn.Module:
    """unet-resnet18 with the course defaults (shared by read-only tests)."""
    return build_generator("unet-resnet18", img_size=64)


def test_registry_names():
    assert set(GENERATORS.names()) == {"compact", "rrdb", "srresnet", "unet-small",
                                       *(f"unet-resnet{d}" for d in (18, 34, 50, 101, 152))}


@pytest.mark.parametrize("arch", [*GENERATORS.names(), "unet-timm:test_resnet", "unet-timm:test_convnext"])
def test_output_shape(arch, request):
    torch.manual_seed(0)
    if arch in BIG_UNETS:
        pytest.skip("340M+ parameter U-Net, 10-30 s to build on CPU; the same code path as unet-resnet18/34, and "
                    "its encoder is checked in test_big_resnet_encoders")
    if arch in ("srresnet", "rrdb", "compact"):
        model = build_generator(arch, scale=4, img_size=64)
        x = torch.randn(1, 3, 12, 20)
        assert _out(model, x).shape == (1, 3, 48, 80)
        return
    model = request.getfixturevalue("unet18") if arch == "unet-resnet18" else build_generator(arch, img_size=64)
    sizes = [(64, 96)] if arch.startswith("unet-resnet") else [(64, 96), (96, 32)]  # non-square, != img_size
    for h, w in sizes:
        y = _out(model, torch.randn(1, 3, h, w))
        assert y.shape == (1, 3, h, w)
        assert type(y) is torch.Tensor  # not fastai's TensorBase
        assert torch.isfinite(y).all()
        assert y.abs().max() <= 3.0  # y_range (-3, 3) by default


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_big_resnet_encoders(depth):
    from srgan.generators import _resnet_body

    body = _resnet_body(depth, pretrained=False, weights=None)
    with torch.no_grad():
        assert body.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048, 2, 2)  # cut before avgpool/fc


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_srresnet_scales(scale):
    model = build_generator("srresnet", scale=scale, n_blocks=2)
    assert _out(model, torch.randn(2, 3, 10, 14)).shape == (2, 3, 10 * scale, 14 * scale)
    assert len(model.upsample) == {2: 1, 4: 2, 8: 3}[scale]
    assert len(model.body) == 2
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())  # linear output


def test_srresnet_paper_layout():
    model = build_generator("srresnet", scale=4)
    assert len(model.body) == 16 and model.head[0].kernel_size == (9, 9) and model.tail.kernel_size == (9, 9)
    assert [s[0].out_channels for s in model.upsample] == [256, 256]
    assert model.crappify_spec == {"arch": "srresnet", "scale": 4, "img_size": 128,
                                   "options": {"n_blocks": 16, "n_feats": 64, "residual": False}}


def test_paper_parameter_counts():
    # SRGAN's SRResNet (16 blocks, 64 features) ≈ 1.5 M; ESRGAN's RRDBNet x4 (23 RRDBs, 64, growth 32) ≈ 16.7 M
    # (16,697,987 in the ESRGAN/Real-ESRGAN release); the x2 model has one upsampling conv fewer.
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert 1.5e6 <= count(build_generator("srresnet", scale=4)) <= 1.6e6
    assert count(build_generator("rrdb", scale=4)) == 16_697_987
    assert count(build_generator("rrdb", scale=2)) == 16_697_987 - (64 * 64 * 9 + 64)


def test_rrdb_layout():
    model = build_generator("rrdb", scale=4, n_blocks=2, n_feats=16, growth=8)
    assert len(model.body) == 2 and len(model.up) == 2
    block = model.body[0].blocks[0]
    assert [c.in_channels for c in block.convs] == [16, 24, 32, 40, 48]
    assert [c.out_channels for c in block.convs] == [8, 8, 8, 8, 16]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Tanh, nn.PixelShuffle)) for m in model.modules())
    assert _out(model, torch.randn(1, 3, 7, 5)).shape == (1, 3, 28, 20)
    assert model.crappify_spec["options"] == {"n_blocks": 2, "n_feats": 16, "growth": 8, "residual": False,
                                              "normalize": "imagenet"}


def _icnr_ok(weight: torch.Tensor) -> bool:
    """Output channels 4c..4c+3 (the 2x2 sub-pixels of channel c after PixelShuffle(2)) share one kernel."""
    w = weight.detach().reshape(weight.shape[0] // 4, 4, *weight.shape[1:])
    return torch.equal(w, w[:, :1].expand_as(w)) and not torch.equal(w[0, 0], w[1, 0])


def test_srresnet_icnr():
    model = build_generator("srresnet", scale=8, n_blocks=1)
    convs = [stage[0] for stage in model.upsample]
    assert len(convs) == 3
    assert all(isinstance(stage[1], nn.PixelShuffle) for stage in model.upsample)
    assert all(_icnr_ok(conv.weight) for conv in convs)


@pytest.mark.parametrize("norm_type, attr", [("weight", "weight_v"), ("spectral", "weight_orig"), (None, "weight")])
def test_unet_pixel_shuffle_icnr(norm_type, attr):
    from fastai.layers import PixelShuffle_ICNR

    model = build_generator("unet-timm:test_resnet", img_size=32, norm_type=norm_type)
    shuffles = [m for m in model.modules() if isinstance(m, PixelShuffle_ICNR)]
    assert len(shuffles) == 5  # 4 UnetBlocks + the final x2 of the stride-2 stem
    assert all(_icnr_ok(getattr(s[0][0], attr)) for s in shuffles)  # spectral: our fix of fastai's lost init


def _norm_counts(model: nn.Module) -> tuple[int, int, int]:
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    return (sum(hasattr(c, "weight_g") for c in convs), sum(hasattr(c, "weight_orig") for c in convs),
            _count(model, nn.BatchNorm2d))


def test_unet_defaults_are_the_course_generator(unet18):
    from fastai.layers import SelfAttention, SigmoidRange

    assert unet18.crappify_spec == {
        "arch": "unet-resnet18", "scale": 1, "img_size": 64,
        "options": {"blur": True, "blur_final": True, "self_attention": True, "norm_type": "weight",
                    "y_range": [-3.0, 3.0], "last_cross": True, "bottle": False, "residual": False,
                    "gain_scale": 1.0}}
    assert json.loads(json.dumps(unet18.crappify_spec)) == unet18.crappify_spec
    assert _count(unet18, SelfAttention) == 1
    (sig,) = [m for m in unet18.modules() if isinstance(m, SigmoidRange)]
    assert (sig.low, sig.high) == (-3.0, 3.0)
    assert _norm_counts(unet18)[0] > 10  # decoder convs weight-normed


def test_unet_options_change_the_model():
    """Each option against the defaults, on timm's tiny test_resnet (the options are the same for every encoder)."""
    from fastai.layers import MergeLayer, PixelShuffle_ICNR, ResBlock, SelfAttention, SigmoidRange

    def build(**options):
        model = build_generator("unet-timm:test_resnet", img_size=32, **options)
        assert _out(model, torch.randn(1, 3, 32, 64)).shape == (1, 3, 32, 64)  # every variant runs
        return model

    def blurs(model):
        return [isinstance(s[-1], nn.AvgPool2d) and isinstance(s[-2], nn.ReplicationPad2d)
                for s in model.modules() if isinstance(s, PixelShuffle_ICNR)]

    def last(model, kind):
        return [m for m in model.modules() if isinstance(m, kind)][-1]

    base = build()
    base_params = _n_params(base)
    assert _count(base, SelfAttention) == 1 and _count(base, SigmoidRange) == 1 and _count(base, MergeLayer) == 1
    assert blurs(base) == [True] * 4 + [False]  # every UnetBlock blurs; fastai's final stem x2 never does

    no_sa = build(self_attention=False)
    assert _count(no_sa, SelfAttention) == 0 and _n_params(no_sa) < base_params

    assert not any(blurs(build(blur=False)))
    assert blurs(build(blur_final=False)) == [True] * 3 + [False, False]

    weight, spectral = _norm_counts(base), _norm_counts(build(norm_type="spectral"))
    batch, none = _norm_counts(build(norm_type="batch")), _norm_counts(build(norm_type=None))
    attention_convs = 3  # fastai's SelfAttention is always spectral-normed
    assert weight[0] > 10 and weight[1] == attention_convs
    assert spectral[0] == 0 and spectral[1] == weight[0] + attention_convs
    assert batch[:2] == none[:2] == (0, attention_convs)
    assert batch[2] > none[2] == weight[2] == spectral[2]

    no_range = build(y_range=None)
    assert _count(no_range, SigmoidRange) == 0
    (sig,) = [m for m in build(y_range=[-1, 2]).modules() if isinstance(m, SigmoidRange)]
    assert (sig.low, sig.high) == (-1.0, 2.0)

    no_cross = build(last_cross=False)
    assert _count(no_cross, MergeLayer) == 0 and _n_params(no_cross) < base_params
    assert last(no_cross, nn.Conv2d).in_channels == last(base, nn.Conv2d).in_channels - 3  # no RGB input concat
    assert _count(no_cross, ResBlock) == _count(base, ResBlock) - 1

    bottle = build(bottle=True)  # fastai 2.8's own bottle=True fails at the first forward: fixed in srgan.generators
    conv, base_conv = last(bottle, ResBlock).convpath[0][0], last(base, ResBlock).convpath[0][0]
    assert base_conv.out_channels == base_conv.in_channels and conv.out_channels == conv.in_channels // 2
    assert last(bottle, nn.Conv2d).in_channels == conv.out_channels
    assert _n_params(bottle) < base_params
    assert _n_params(build(last_cross=False, bottle=True)) == _n_params(no_cross)  # bottle only shapes the cross


@pytest.mark.parametrize("arch, kwargs", [
    ("unet-resnet18", {}),
    ("unet-timm:test_resnet", {"norm_type": "spectral", "y_range": None, "bottle": True, "blur": False}),
    ("srresnet", {"scale": 2, "n_blocks": 3, "n_feats": 16}),
    ("rrdb", {"scale": 2, "n_blocks": 1, "n_feats": 8, "growth": 4}),
])
def test_rebuild_from_spec(arch, kwargs, request):
    torch.manual_seed(1)
    if arch == "unet-resnet18":
        model, x = request.getfixturevalue("unet18"), torch.randn(1, 3, 64, 64)
    else:
        model = build_generator(arch, img_size=64, **kwargs)
        x = torch.randn(1, 3, 16, 16) if arch in ("srresnet", "rrdb") else torch.randn(1, 3, 64, 96)
        model.train()(x)  # move BatchNorm running stats and spectral-norm vectors away from their init
    spec = json.loads(json.dumps(model.crappify_spec))  # as stored in a safetensors file's metadata
    again = build_generator(spec["arch"], scale=spec["scale"], img_size=spec["img_size"], pretrained=False,
                            **spec["options"])
    assert again.crappify_spec == model.crappify_spec
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in again.state_dict().items()}
    before = _out(again, x)
    again.load_state_dict(state)
    after, expected = _out(again, x), _out(model, x)
    assert torch.equal(after, expected) and not torch.equal(before, expected)


def test_spec_options_are_canonical():
    model = build_generator("unet-timm:test_resnet", img_size=32, norm_type="Spectral", y_range=(-1, 2))
    assert model.crappify_spec["options"]["norm_type"] == "spectral"
    assert model.crappify_spec["options"]["y_range"] == [-1.0, 2.0]
    assert build_generator("unet-timm:test_resnet", img_size=32, norm_type="none").crappify_spec["options"][
        "norm_type"] is None
    assert model.training  # fastai's dummy passes leave parts in eval mode; the model comes back in train mode
    assert all(m.training for m in model.modules())


def test_clone_generator(unet18):
    clone = clone_generator(unet18)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_out(unet18, x), _out(clone, x))
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.01)
    assert not torch.equal(_out(unet18, x), _out(clone, x))


def test_pretrained_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="--no-pretrained") as err:
        build_generator("unet-resnet34", pretrained=True)
    assert time.perf_counter() - t0 < 5
    assert "resnet34" in str(err.value) and str(tmp_path) in str(err.value)


def test_pretrained_timm_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="--no-pretrained"):
        build_generator("unet-timm:test_resnet", pretrained=True)
    assert time.perf_counter() - t0 < 5


def test_pretrained_from_local_torch_file(tmp_path):
    import torchvision

    torch.manual_seed(2)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = build_generator("unet-resnet18", img_size=32, pretrained=True, weights=str(path))
    encoder = model[0]
    assert torch.equal(encoder[0].weight, saved["conv1.weight"])  # the stem conv
    assert torch.equal(encoder[7][1].conv2.weight, saved["layer4.1.conv2.weight"])
    assert "fc.weight" not in encoder.state_dict()
    with pytest.raises(WeightsError, match="do not fit"):  # resnet18 weights into a resnet34
        build_generator("unet-resnet34", pretrained=True, weights=str(path))
    with pytest.raises(WeightsError, match="not found"):
        build_generator("unet-resnet18", pretrained=True, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="no-pretrained"):
        build_generator("unet-resnet18", pretrained=False, weights=str(path))


def test_pretrained_timm_from_local_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    saved = timm.create_model("test_resnet", pretrained=False).state_dict()
    path = tmp_path / "test_resnet.safetensors"
    save_file(saved, str(path))
    encoder = build_generator("unet-timm:test_resnet", img_size=32, pretrained=True, weights=path)[0]
    state = encoder.state_dict()
    assert "conv1.0.weight" in state
    shared = [k for k in state if k in saved]
    assert len(shared) == len(state)
    assert all(torch.equal(state[k], saved[k]) for k in shared)


def test_srresnet_weights_file(tmp_path):
    from safetensors.torch import save_file

    trained = build_generator("srresnet", scale=2, n_blocks=1)
    path = tmp_path / "srresnet.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = build_generator("srresnet", scale=2, n_blocks=1, pretrained=True, weights=path)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(_out(trained, x), _out(loaded, x))
    build_generator("srresnet", scale=2, n_blocks=1, pretrained=True)  # no ImageNet weights exist: nothing to load


@pytest.mark.parametrize("arch, kwargs, match", [
    ("srresnet", {"scale": 3}, "2, 4 or 8"),
    ("srresnet", {"scale": 1}, "2, 4 or 8"),
    ("unet-resnet34", {"scale": 4}, "scale must be 1"),
    ("unet-timm:test_resnet", {"scale": 2}, "scale must be 1"),
    ("unet-resnet34", {"img_size": 16}, "at least 32"),
    ("resnet34", {}, "valid: compact, rrdb, srresnet, unet-resnet101.*unet-resnet34.*unet-timm:"),
    ("unet-timm:not_a_timm_model", {}, "timm model name is expected"),
    ("unet-timm:resnt18", {}, "close matches: resnet18"),
    ("unet-timm:", {}, "timm model name"),
    ("unet-timm:test_vit", {}, "U-Net encoder"),
    ("unet-timm:test_mambaout", {}, "NCHW"),  # channels-last stages
    ("unet-timm:test_maxvit", {"img_size": 64}, "does not run as a U-Net encoder at img_size 64"),
    ("unet-resnet18", {"blurr": True}, r"blurr.*valid: blur, blur_final, bottle"),
    ("srresnet", {"scale": 4, "blur": True}, "valid: n_blocks, n_feats"),
    ("unet-resnet18", {"norm_type": "instance"}, "norm_type"),
    ("unet-resnet18", {"y_range": [3, -3]}, "low < high"),
    ("unet-resnet18", {"y_range": 3}, "y_range"),
    ("unet-resnet18", {"blur": "yes"}, "true or false"),
    ("srresnet", {"scale": 2, "n_blocks": 0}, "n_blocks"),
    ("rrdb", {"scale": 3}, "2 or 4"),
    ("rrdb", {"scale": 4, "growth": 0}, "growth"),
])
def test_config_errors(arch, kwargs, match):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        build_generator(arch, **kwargs)
    if "scale" in kwargs and arch.startswith("unet"):
        assert time.perf_counter() - t0 < 1  # checked before the encoder is built


# --------------------------------------------------------------------------------------------------------
# residual generators: untrained = the bicubic baseline


RESIDUAL_UNETS = [*(a for a in GENERATORS.names() if a.startswith("unet") and a not in BIG_UNETS),
                  "unet-timm:test_resnet"]


def _lr_image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    smooth = cv2.resize(rng.integers(0, 256, (h // 3 + 2, w // 3 + 2, 3), dtype=np.uint8), (w, h))
    return np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("arch", RESIDUAL_UNETS)
def test_untrained_residual_unet_is_the_bicubic_baseline(arch, request):
    torch.manual_seed(0)
    model = build_generator(arch, img_size=64, residual=True).eval()
    norm = Normalizer()
    lr = _lr_image(20, 24)
    for scale in (2, 3, 4):
        base = resize_image(lr, (24 * scale, 20 * scale))  # what evaluate calls bicubic
        h, w = base.shape[:2]
        x = torch.from_numpy(base[: h // 32 * 32, : w // 32 * 32]).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = norm.to_uint8(model(norm.normalize(x)))
        assert torch.equal(out, x), f"{arch} x{scale}"


SR_SMALL = {"srresnet": {"n_blocks": 2, "n_feats": 16}, "rrdb": {"n_blocks": 1, "n_feats": 8, "growth": 4}}


@pytest.mark.parametrize("arch, scale", [("srresnet", 2), ("srresnet", 4), ("srresnet", 8), ("rrdb", 2),
                                         ("rrdb", 4)])
def test_untrained_residual_sr_model_is_the_bicubic_baseline(arch, scale):
    torch.manual_seed(0)
    model = build_generator(arch, scale=scale, img_size=64, residual=True, **SR_SMALL[arch]).eval()
    norm = Normalizer()
    lr = _lr_image(13, 17)
    base = torch.from_numpy(resize_image(lr, (17 * scale, 13 * scale))).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = norm.to_uint8(model(norm.normalize(torch.from_numpy(lr).permute(2, 0, 1)[None])))
    diff = (out.int() - base.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # float rounding at .5 ties at most


@pytest.mark.parametrize("norm_type", ["weight", "spectral", None])
def test_residual_unet_trains_with_every_norm(norm_type):
    torch.manual_seed(0)
    model = build_generator("unet-small", img_size=32, residual=True, norm_type=norm_type)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = _out(model, x)
    assert torch.isfinite(out).all() and not torch.allclose(out, x)
    assert out.abs().max() <= 3.0  # y_range limits the sum


def test_residual_option_round_trips_and_old_files_load_as_plain(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from srgan.checkpoint import load_generator, save_generator

    torch.manual_seed(0)
    model = build_generator("unet-small", img_size=32, residual=True)
    save_generator(model, tmp_path / "g.safetensors", data_scale=2)
    back = load_generator(tmp_path / "g.safetensors")
    assert back.crappify_spec["options"]["residual"] is True
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_out(back, x), _out(model, x))
    plain = build_generator("unet-small", img_size=32)
    save_generator(plain, tmp_path / "p.safetensors", data_scale=2)
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    spec = json.loads(meta["spec"])
    del spec["options"]["residual"]  # a file written before the option existed
    save_file(tensors, tmp_path / "old.safetensors", metadata={**meta, "spec": json.dumps(spec)})
    old = load_generator(tmp_path / "old.safetensors")
    assert old.crappify_spec["options"]["residual"] is False
    assert torch.equal(_out(old, x), _out(plain, x))


def test_unet_small_is_small_and_trains_one_step():
    torch.manual_seed(0)
    model = build_generator("unet-small", img_size=64)
    assert _n_params(model) < 3_000_000
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = torch.nn.functional.l1_loss(model(x), x)
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _out(model, torch.randn(1, 3, 96, 160)).shape == (1, 3, 96, 160)


def test_gain_scale_keeps_the_bicubic_start_speeds_the_gain_and_round_trips(tmp_path):
    """`gain_scale` K: still exactly the input at first; one Adam step moves the correction's effective gain K
    times as far (Adam steps every parameter by about the learning rate); the file rebuilds the same model; a
    bad value is a one-line error."""
    from srgan.checkpoint import load_generator, save_generator

    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    gains = {}
    for k in (1, 10):
        torch.manual_seed(0)
        model = build_generator("unet-small", img_size=32, residual=True, gain_scale=k)
        assert torch.allclose(_out(model, x), x.clamp(-3, 3))
        model.train()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        gains[k] = (k * model.layers[-1].gain).detach()
    assert torch.allclose(gains[10], 10 * gains[1], rtol=1e-3)
    save_generator(model, tmp_path / "g.safetensors", data_scale=2)
    back = load_generator(tmp_path / "g.safetensors")
    assert back.crappify_spec["options"]["gain_scale"] == 10.0 and torch.equal(_out(back, x), _out(model, x))
    with pytest.raises(ConfigError, match="gain_scale"):
        build_generator("unet-small", img_size=32, residual=True, gain_scale=0)



@pytest.mark.parametrize("arch, kwargs", [
    ("unet-small", {}), ("unet-small", {"residual": True, "norm_type": "spectral"}), ("unet-resnet18", {}),
    ("srresnet", {"n_blocks": 1}), ("rrdb", {"n_blocks": 1, "n_feats": 8, "growth": 8}), ("compact", {})])
def test_a_channels_last_input_stays_channels_last_through_every_conv(arch, kwargs, request):
    """fastai's SelfAttention ends in `.contiguous()`: with channels_last on (the default), a U-Net's whole decoder
    after it ran in the plain layout, most of the network's compute (benchmarks/README.md). The output is the
    plain-layout network's, and the file's keys are unchanged (the fix is a forward hook, no module)."""
    torch.manual_seed(0)
    unet = arch.startswith("unet")
    model = request.getfixturevalue("unet18") if arch == "unet-resnet18" else \
        build_generator(arch, scale=1 if unet else 2, img_size=64, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    assert convs_without_channels_last(model.train(), x) == []
    with torch.no_grad():
        plain = model.eval().to(memory_format=torch.contiguous_format)(x)
        last = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)
    if unet:  # each has the attention layer that dropped the layout
        from fastai.layers import SelfAttention

        assert _count(model, SelfAttention) == 1
