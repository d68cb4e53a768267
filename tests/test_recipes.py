"""Each shipped pipeline against the recipe it names: the settings that define the recipe, taken from
../shared/REFERENCE.md and ../shared/seeds (listed per recipe below), must be what the pipeline resolves to, so
an edit that drifts from the source fails here. Losses are built (random VGG weights) and checked by the layers
they tap, not by how the YAML spells them. Each training stage states its Adam (betas, eps, weight decay) and
the GAN stage its content loss in the file itself, so what runs never hangs on a default."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml

from crappify.chain import PRESETS, load_preset
from srgan.generators import build_generator
from srgan.losses import build_loss
from srgan.pipeline import PIPELINES_DIR, load_pipeline, stage_configs

# torchvision's VGG `.features` indices: the layer just before (conv) or after (relu) the activation
VGG19 = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34, "relu3_4": 17, "relu5_4": 35}
VGG16 = {"relu2_2": 8, "relu5_3": 29}

# The sources' Adam settings, (betas, eps, weight decay). torch's Adam (PyTorch ports, Real-ESRGAN, the WGAN-GP
# paper's TensorFlow code, Keras 1) defaults to eps 1e-8; the fastai course ran fastai v1, whose Adam is torch's
# with betas (0.9, 0.99) and beta1 cycled 0.95 -> 0.85 -> 0.95 by fit_one_cycle: betas None (fastai's default
# here too), eps 1e-8, and the course's wd 1e-3.
COURSE = (None, 1e-8, 1e-3)
COURSE_GAN = ((0.0, 0.99), 1e-8, 1e-3)  # GANLearner.from_learners(opt_func=partial(optim.Adam, betas=(0., 0.99)), wd)
PAPER = ((0.9, 0.999), 1e-8, 0.0)  # SRGAN paper: beta1 0.9 (beta2, eps: Adam's defaults); Keras 1's defaults too

# recipe -> stage -> {config key: value}; "stages" lists which stages the recipe has; "adam": stage -> the
# source's (betas, eps, wd); "content": the GAN stage's content loss, which its YAML must state
RECIPES: dict[str, dict[str, Any]] = {
    # SRGAN paper (doc 000; REFERENCE "SRGAN"): SRResNet pretrained with MSE, VGG19 phi5,4 / 12.75, 1e-3 adversarial,
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
        "adam": {"train-gen": PAPER, "train-critic": PAPER, "train-gan": PAPER},
    },
    # PyTorch-GAN's SRGAN (source doc 001): joint from scratch, per batch G then D on the same fakes, LSGAN, patch D,
    # VGG19 features[:18] L1, content + 1e-3 adversarial, Adam 2e-4 (0.5, 0.999), HR 256 / LR 64, batch 4
    "celeba-pytorch-gan": {
        "stages": ["build-dataset", "train-gan", "evaluate"],
        "build-dataset": {"preset": "srgan-x4", "square": 256, "source": "celeba"},
        "train-gan": {"generator_arch": "srresnet", "critic_arch": "patch", "adv_loss": "lsgan", "w_content": 1.0,
                      "w_adv": 1e-3, "switching": "per-batch", "lr": 2e-4, "critic_lr_mult": 1.0,
                      "betas": [0.5, 0.999], "size": 256, "bs": 4},
        "generator": ("srresnet", {"n_blocks": 16, "n_feats": 64}),
        "content": {"vgg": (1.0, "vgg19", [VGG19["relu3_4"]], None, "l1", 1.0)},
        "adam": {"train-gan": ((0.5, 0.999), 1e-8, 0.0)},  # torch.optim.Adam(lr=2e-4, betas=(0.5, 0.999))
    },
    # SR-GAN with WGAN-GP (source doc 002): x2, RRDB, SRGAN discriminator 64 -> 512, L1 + VGG + adversarial 1:1:1,
    # Wasserstein + gradient penalty (no BCE pretraining), mixed precision, batch 16
    "celeba-wgan-gp": {
        "stages": ["build-dataset", "train-gen", "train-gan", "evaluate"],
        "build-dataset": {"preset": "bicubic-x2", "source": "celeba"},
        "train-gen": {"arch": "rrdb", "bs": 16, "precision": "auto"},
        "train-gan": {"critic_arch": "srgan", "critic_options": {"nf": 64, "n_blocks": 4}, "adv_loss": "wgan-gp",
                      "gp_weight": 10.0, "w_content": 1.0, "w_adv": 1.0, "bs": 16, "precision": "auto"},
        "generator": ("rrdb", {"n_blocks": 23, "n_feats": 64, "growth": 32}),
        "content": {"l1": 1.0, "vgg19": (1.0, "vgg19", [VGG19["relu5_4"]], None, "mse", 1.0)},
        # the source doc gives no optimiser: torch's defaults for the L1 warm-up, the WGAN-GP paper's Adam (0, 0.9)
        "adam": {"train-gen": ((0.9, 0.999), 1e-8, 0.0), "train-gan": ((0.0, 0.9), 1e-8, 0.0)},
    },
    # source doc 003: Flickr30k crappified by OpenCV + blank rectangles (flickr30k-restore, no quality text), ResNet-34
    # U-Net with MSE, BCE critic, each pretrained a little, then adaptive switching; the rest from the course
    "flickr30k-unet-mse": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"source": "flickr30k", "preset": "flickr30k-restore", "scale": 4},
        "train-gen": {"arch": "unet-resnet34", "loss": "mse"},
        "train-critic": {"arch": "gan-critic"},
        "train-gan": {"adv_loss": "bce", "switching": "adaptive", "weighting": "course"},
        "content": {"mse": 1.0},  # the source doc's generator loss
        "adam": {"train-gen": COURSE, "train-critic": COURSE, "train-gan": COURSE_GAN},
    },
    # fastai course lesson 7 (REFERENCE): ResNet-34 U-Net, feature loss, 128 px bs 32 then 256 px bs 12,
    # gan_critic 6 epochs at 1e-3, AdaptiveGANSwitcher(0.65), weights_gen (1, 50), critic lr x5, Adam (0, 0.99)
    "flickr30k-lesson7": {
        "stages": ["build-dataset", "train-gen", "train-critic", "train-gan", "evaluate"],
        "build-dataset": {"source": "flickr30k", "preset": "lesson7-occlude"},
        "train-gen": {"arch": "unet-resnet34", "loss": "feature", "pct_start": 0.9, "wd": 1e-3},
        "train-critic": {"arch": "gan-critic", "epochs": 6, "lr": 1e-3},
        "train-gan": {"adv_loss": "bce", "switching": "adaptive", "critic_thresh": 0.65, "weighting": "course",
                      "critic_lr_mult": 5.0, "betas": [0.0, 0.99], "lr": 1e-4},
        "schedule": [(128, 32), (256, 12)],
        # the GAN notebook's content loss: pixel MSE, which its weights_gen (1, 50) was set for
        "content": {"mse": 1.0},
        "adam": {"train-gen": COURSE, "train-critic": COURSE, "train-gan": COURSE_GAN},
    },
    # Keras SRGAN (source doc 004): SRResNet with sub-pixel x4; pretraining VGG16 conv2_2 (after its ReLU) + TV only;
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
        "adam": {"train-gen": PAPER, "train-critic": PAPER, "train-gan": PAPER},  # Adam(lr=1e-4), Keras 1 defaults
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
        # BasicSR's pixel convention (RGB in [0, 1]), so the result exports to spandrel/chaiNNer as it is
        "generator": ("rrdb", {"n_blocks": 23, "n_feats": 64, "growth": 32, "normalize": "none"}),
        "content": {"l1": 1.0, "vgg": (1.0, "vgg19", [VGG19[k] for k in ("conv1_2", "conv2_2", "conv3_4", "conv4_4",
                                                                         "conv5_4")],
                                       [0.1, 0.1, 1.0, 1.0, 1.0], "l1", 1.0)},
        # train_realesrnet_x4plus.yml / train_realesrgan_x4plus.yml: Adam betas [0.9, 0.99], weight_decay 0
        "adam": {"train-gen": ((0.9, 0.99), 1e-8, 0.0), "train-gan": ((0.9, 0.99), 1e-8, 0.0)},
    },
}
NOT_RECIPES = {"demo"}  # the embedded CPU-sized default, measured in benchmarks/README.md, not a reproduction


def _configs(name: str) -> dict[str, Any]:
    return stage_configs(load_pipeline(PIPELINES_DIR / f"{name}.yaml", out="runs/x"))


def _raw(name: str) -> dict[str, Any]:
    """The pipeline file's own sections, as written (no defaults filled in)."""
    return yaml.safe_load((PIPELINES_DIR / f"{name}.yaml").read_text())


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
    _check_loss(gan.loss, recipe["content"])
    if "pretrain" in recipe:
        _check_loss(gen.loss, recipe["pretrain"])
    if "schedule" in recipe:
        assert [(st.size, st.bs) for st in gen.resolved().schedule()] == recipe["schedule"]
    if gan.weighting == "srgan" and gan.w_adv is None:
        assert gan.content_adv_weights() == (1.0, 1e-3)


def test_sub_pixel_upsampling_in_the_keras_recipe():
    """Source document 004 moved from transposed convolutions (grids at x4) to sub-pixel convolution."""
    gen = _configs("srgan-keras-vgg16-tv")["train-gen"]
    model = build_generator(gen.arch, scale=4, **gen.resolved().options)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.PixelShuffle in kinds and torch.nn.ConvTranspose2d not in kinds


def test_course_weighting_puts_50_on_content():
    gan = _configs("flickr30k-lesson7")["train-gan"]
    assert gan.content_adv_weights() == (50.0, 1.0)
    text = (PIPELINES_DIR / "flickr30k-lesson7.yaml").read_text()
    assert "content x 50" in text and "adversarial x 1" in text



@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_training_stage_runs_its_sources_adam_and_says_so(name):
    """betas, eps and weight decay of train-gen, train-critic and train-gan (where the recipe has the stage) are the
    source's, each written in the stage's section (`betas: null` for fastai's one-cycle momentum)."""
    recipe, cfgs, raw = RECIPES[name], _configs(name), _raw(name)
    stages = [s for s in ("train-gen", "train-critic", "train-gan") if s in cfgs]
    assert sorted(recipe["adam"]) == sorted(stages), name
    for stage, (betas, eps, wd) in recipe["adam"].items():
        cfg = cfgs[stage]
        assert {"betas", "eps", "wd"} <= set(raw[stage]), f"{name} {stage}: state betas, eps and wd"
        got = None if cfg.betas is None else list(cfg.betas)
        assert got == (None if betas is None else pytest.approx(list(betas))), f"{name} {stage}.betas"
        assert cfg.eps == pytest.approx(eps) and cfg.wd == pytest.approx(wd), f"{name} {stage}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_gan_stage_states_its_content_loss(name):
    """train-gan falls back on the generator's train-gen loss when `loss` is left out; a recipe never does."""
    assert _raw(name)["train-gan"].get("loss") is not None, f"{name}: train-gan must state its content loss"


def test_flickr30k_lesson7_gan_phase_uses_the_course_gan_notebooks_mse():
    """The course's x 50 content weight is for pixel MSE; train-gen still pretrains with the feature loss."""
    cfgs = _configs("flickr30k-lesson7")
    assert cfgs["train-gen"].loss == "feature" and cfgs["train-gan"].loss == "mse"
    assert cfgs["train-gan"].content_adv_weights() == (50.0, 1.0)


def test_document_003s_crappifier_is_one_preset_and_flickr30k_unet_mse_builds_with_it():
    """Source document 003 (the design card): an OpenCV crappifier plus blank rectangles, no lesson-7 quality text.
    Exactly one preset says it is that one, and that document's pipeline uses it; the lesson-7 + rectangles preset
    does not claim it."""
    chains = [load_preset(name) for name in PRESETS]
    chains += [load_preset(path) for path in sorted((PIPELINES_DIR / "presets").glob("*.yaml"))]
    claims = [c.name for c in chains if "design card" in c.description.replace("-", " ") or "003" in c.description]
    assert claims == ["flickr30k-restore"]
    chain = load_preset(_configs("flickr30k-unet-mse")["build-dataset"].preset)
    assert chain.name == "flickr30k-restore"
    ops = [step.op.name for step in chain.steps]
    assert "text" not in ops and ops[-1] == "occlude"
    lesson7 = load_preset(_configs("flickr30k-lesson7")["build-dataset"].preset)
    assert lesson7.name == "lesson7-occlude" and "text" in [step.op.name for step in lesson7.steps]
