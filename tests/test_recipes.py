"""Each shipped pipeline against the recipe it names: the settings that define the recipe, taken from
../shared/REFERENCE.md and ../shared/seeds (listed per recipe below), must be what the pipeline resolves to, so
an edit that drifts from the source fails here. Losses are built (random VGG weights) and checked by the layers
they tap, not by how the YAML spells them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from crappify.chain import load_preset
from srgan.generators import build_generator
from srgan.losses import build_loss
from srgan.pipeline import PIPELINES_DIR, load_pipeline, stage_configs

# torchvision's VGG `.features` indices: the layer just before (conv) or after (relu) the activation
VGG19 = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34, "relu3_4": 17, "relu5_4": 35}
VGG16 = {"relu2_2": 8, "relu5_3": 29}

# recipe -> stage -> {config key: value}; "stages" lists which stages the recipe has
RECIPES: dict[str, dict[str, Any]] = {
    # SRGAN paper (seed 000; REFERENCE "SRGAN"): SRResNet pretrained with MSE, VGG19 phi5,4 / 12.75, 1e-3 adversarial,
    # the paper's discriminator, Adam (0.9, 0.999) 1e-4, batch 16, 96 px HR crops, x4 bicubic
    "celeba-hq-srgan-x4": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"preset": "srgan-x4"},
        "train-gen": {"arch": "srresnet", "loss": "mse", "size": 96, "bs": 16},
        "train-critic": {"arch": "srgan"},
        "train-gan": {"adv_loss": "bce", "w_content": None, "weighting": "srgan", "switching": "fixed",
                      "n_crit": 1, "n_gen": 1, "lr": 1e-4, "betas": [0.9, 0.999], "bs": 16, "size": 96},
        "generator": ("srresnet", {"n_blocks": 16, "n_feats": 64}),
        "content": {"vgg19": (1.0, "vgg19", [VGG19["relu5_4"]], None, "mse", 1 / 12.75)},
    },
    # PyTorch-GAN's SRGAN (seed 001): joint from scratch, per batch G then D on the same fakes, LSGAN, patch D,
    # VGG19 features[:18] L1, content + 1e-3 adversarial, Adam 2e-4 (0.5, 0.999), HR 256 / LR 64, batch 4
    "celeba-pytorch-gan": {
        "stages": ["build-dataset", "train-gan", "evaluate"],
        "build-dataset": {"preset": "srgan-x4", "square": 256, "source": "celeba"},
        "train-gan": {"generator_arch": "srresnet", "critic_arch": "patch", "adv_loss": "lsgan", "w_content": 1.0,
                      "w_adv": 1e-3, "switching": "per-batch", "lr": 2e-4, "critic_lr_mult": 1.0,
                      "betas": [0.5, 0.999], "size": 256, "bs": 4},
        "generator": ("srresnet", {"n_blocks": 16, "n_feats": 64}),
        "content": {"vgg": (1.0, "vgg19", [VGG19["relu3_4"]], None, "l1", 1.0)},
    },
    # SR-GAN with WGAN-GP (seed 002): x2, RRDB, SRGAN discriminator 64 -> 512, L1 + VGG + adversarial 1:1:1,
    # Wasserstein + gradient penalty (no BCE pretraining), mixed precision, batch 16
    "celeba-wgan-gp": {
        "stages": ["build-dataset", "train-gen", "train-gan", "evaluate"],
        "build-dataset": {"preset": "bicubic-x2", "source": "celeba"},
        "train-gen": {"arch": "rrdb", "bs": 16, "precision": "auto"},
        "train-gan": {"critic_arch": "srgan", "critic_options": {"nf": 64, "n_blocks": 4}, "adv_loss": "wgan-gp",
                      "gp_weight": 10.0, "w_content": 1.0, "w_adv": 1.0, "bs": 16, "precision": "auto"},
        "generator": ("rrdb", {"n_blocks": 23, "n_feats": 64, "growth": 32}),
        "content": {"l1": 1.0, "vgg19": (1.0, "vgg19", [VGG19["relu5_4"]], None, "mse", 1.0)},
    },
    # seed 003: Flickr30k, crappified + blank rectangles, ResNet-34 U-Net with MSE, BCE critic, each pretrained
    # a little, then adaptive switching
    "flickr30k-unet-mse": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"source": "flickr30k"},
        "train-gen": {"arch": "unet-resnet34", "loss": "mse"},
        "train-critic": {"arch": "gan-critic"},
        "train-gan": {"adv_loss": "bce", "switching": "adaptive"},
    },
    # fastai course lesson 7 (REFERENCE): ResNet-34 U-Net, feature loss, 128 px bs 32 then 256 px bs 12,
    # gan_critic 6 epochs at 1e-3, AdaptiveGANSwitcher(0.65), weights_gen (1, 50), critic lr x5, Adam (0, 0.99)
    "flickr30k-lesson7": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"source": "flickr30k"},
        "train-gen": {"arch": "unet-resnet34", "loss": "feature", "pct_start": 0.9, "wd": 1e-3},
        "train-critic": {"arch": "gan-critic", "epochs": 6, "lr": 1e-3},
        "train-gan": {"adv_loss": "bce", "switching": "adaptive", "critic_thresh": 0.65, "weighting": "course",
                      "critic_lr_mult": 5.0, "betas": [0.0, 0.99], "lr": 1e-4},
        "schedule": [(128, 32), (256, 12)],
    },
    # Keras SRGAN (seed 004): SRResNet with sub-pixel x4; pretraining VGG16 conv2_2 (after its ReLU) + TV only;
    # then VGG16 conv5_3 + TV + adversarial; Adam 1e-4 (0.9, 0.999), batch 16
    "srgan-keras-vgg16-tv": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"preset": "srgan-x4"},
        "train-gen": {"arch": "srresnet", "bs": 16},
        "train-critic": {"arch": "srgan"},
        "train-gan": {"lr": 1e-4, "betas": [0.9, 0.999], "bs": 16},
        "generator": ("srresnet", {}),
        "pretrain": {"vgg": (1.0, "vgg16", [VGG16["relu2_2"]], None, "mse", 1.0), "tv": None},
        "content": {"vgg": (1.0, "vgg16", [VGG16["relu5_3"]], None, "mse", 1.0), "tv": None},
    },
    # Real-ESRGAN x4 (REFERENCE): on-the-fly second-order degradations, RRDB, Real-ESRNet L1, then L1 + VGG19
    # conv1_2..conv5_4 (before activation) 0.1/0.1/1/1/1 + GAN x0.1, U-Net SN critic, no critic pretraining,
    # EMA 0.999, Adam (0.9, 0.99), 2e-4 then 1e-4, USM-sharpened GT, GT 256, batch 12
    "realesrgan-x4": {
        "stages": ["build-dataset", "train-gen", "train-gan", "evaluate"],
        "build-dataset": {"preset": "realesrgan"},
        "train-gen": {"arch": "rrdb", "loss": "l1", "degrade": "online", "sharpen_gt": True, "lr": 2e-4,
                      "size": 256, "bs": 12, "wd": 0.0},
        "train-gan": {"critic_arch": "unet-sn", "adv_loss": "bce", "w_content": 1.0, "w_adv": 0.1,
                      "switching": "per-batch", "ema": True, "ema_decay": 0.999, "betas": [0.9, 0.99], "lr": 1e-4,
                      "critic_lr_mult": 1.0, "degrade": "online", "sharpen_gt": True, "size": 256, "bs": 12,
                      "wd": 0.0},
        "generator": ("rrdb", {"n_blocks": 23, "n_feats": 64, "growth": 32}),
        "content": {"l1": 1.0, "vgg": (1.0, "vgg19", [VGG19[k] for k in ("conv1_2", "conv2_2", "conv3_4", "conv4_4",
                                                                         "conv5_4")],
                                       [0.1, 0.1, 1.0, 1.0, 1.0], "l1", 1.0)},
    },
}
NOT_RECIPES = {"demo"}  # the embedded CPU-sized default, measured in benchmarks/README.md, not a reproduction


def _configs(name: str) -> dict[str, Any]:
    return stage_configs(load_pipeline(PIPELINES_DIR / f"{name}.yaml", out="runs/x"))


def test_every_shipped_pipeline_is_checked_against_its_recipe():
    shipped = {p.stem for p in PIPELINES_DIR.glob("*.yaml")}
    assert shipped - NOT_RECIPES == set(RECIPES), "add the new pipeline's must-match settings to RECIPES"
    for name in shipped - NOT_RECIPES:
        header = (PIPELINES_DIR / f"{name}.yaml").read_text().splitlines()[:40]
        assert any("Departures and why" in line for line in header), f"{name}: its header lists no departures"


def _check_loss(loss: Any, expected: dict[str, Any]) -> None:
    """`expected`: part name -> weight, or (weight, net, layer indices, layer weights, criterion, scale)."""
    built = build_loss(loss, pretrained=False)
    assert set(built.weights) == set(expected)
    for part, want in expected.items():
        if not isinstance(want, tuple):
            assert want is None or built.weights[part] == pytest.approx(want), part
            continue
        weight, net, ids, layer_weights, criterion, scale = want
        module = built.parts[part]
        assert built.weights[part] == pytest.approx(weight), part
        assert module.arch == net, part
        got_ids = list(getattr(module, "layer_ids", [getattr(module, "layer_id", None)]))
        assert got_ids == ids, part
        if layer_weights is not None:
            assert list(module.layer_weights) == pytest.approx(layer_weights), part
        assert module.criterion == criterion and module.feature_scale == pytest.approx(scale), part


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pipeline_matches_its_recipe(name):
    recipe, cfgs = RECIPES[name], _configs(name)
    assert list(cfgs) == recipe["stages"]
    for stage in ("build-dataset", "train-gen", "train-critic", "train-gan"):
        values = cfgs[stage].model_dump(mode="json") if stage in cfgs else {}
        for key, want in recipe.get(stage, {}).items():
            got = values[key]
            if key == "preset":
                got = load_preset(got).name
            assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{name} {stage}.{key}"
    gen = cfgs.get("train-gen")
    gan = cfgs["train-gan"]
    if "generator" in recipe:
        arch, options = recipe["generator"]
        if gen is not None:
            assert gen.arch == arch
            built = build_generator(arch, scale=4, **gen.resolved().options).crappify_spec["options"]
        else:
            assert gan.generator_arch == arch
            built = build_generator(arch, scale=4, **gan.generator_options).crappify_spec["options"]
        assert {k: built[k] for k in options} == options
    if "content" in recipe:
        _check_loss(gan.loss, recipe["content"])
    if "pretrain" in recipe:
        _check_loss(gen.loss, recipe["pretrain"])
    if "schedule" in recipe:
        assert [(st.size, st.bs) for st in gen.resolved().schedule()] == recipe["schedule"]
    if gan.weighting == "srgan" and gan.w_adv is None:
        assert gan.content_adv_weights() == (1.0, 1e-3)


def test_sub_pixel_upsampling_in_the_keras_recipe():
    """Seed 004 moved from transposed convolutions (grids at x4) to sub-pixel convolution."""
    gen = _configs("srgan-keras-vgg16-tv")["train-gen"]
    model = build_generator(gen.arch, scale=4, **gen.resolved().options)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.PixelShuffle in kinds and torch.nn.ConvTranspose2d not in kinds


def test_course_weighting_puts_50_on_content():
    gan = _configs("flickr30k-lesson7")["train-gan"]
    assert gan.content_adv_weights() == (50.0, 1.0)
    text = (PIPELINES_DIR / "flickr30k-lesson7.yaml").read_text()
    assert "content x 50" in text and "adversarial x 1" in text

