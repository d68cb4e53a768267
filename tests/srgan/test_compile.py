"""--compile (torch.compile): a training step of every generator arch, and of a critic, gives what an uncompiled
run gives; the files it writes are an uncompiled run's; a run resumes across compile on and off; compiled tiled
inference gives the same output with one input shape for photos of every size; no graph breaks in our networks.

On the CPU inductor compiles C++: with a cold cache (a fresh machine, as in CI) each compiling test takes tens of
seconds, hence `slow` (still run by default; `-m "not slow"` skips them). Later runs hit inductor's on-disk cache
($TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_$USER) and take seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from srgan.checkpoint import config_key, load_checkpoint, load_critic, load_generator, save_generator
from srgan.data import read_dataset
from srgan.enhance import enhance
from srgan.generators import build_generator
from srgan.inference import TiledInference
from srgan.runtime import CompiledForward, compile_module
from srgan.train_critic import RUN_KEYS as CRITIC_RUN_KEYS
from srgan.train_critic import TrainCriticConfig, train_critic
from srgan.train_gan import RUN_KEYS as GAN_RUN_KEYS
from srgan.train_gan import TrainGanConfig, train_gan
from srgan.train_gen import RUN_KEYS, Trainer, TrainGenConfig

# The smallest of each arch that is still that arch. The ResNet U-Nets are fastai's DynamicUnet as unet-small is,
# on torchvision's ResNet encoders: compiled here only to the graph (no graph breaks, below), since inductor's C++
# compilation of one takes 80-90 s on a cold 2-core CPU (unet-small's 60-70 s already covers the U-Net code).
ARCHS = {
    # weight norm off: 15 s less of C++ compilation on a cold cache; the blur's padding (the inductor bug
    # generators.BlurPad works around) and the rest of the U-Net stay
    "unet-small": {"arch": "unet-small", "size": 32, "options": {"norm_type": None}},
    # with a small perceptual part: the loss network compiled too, and a weight-1 part (see CombinedLoss)
    "srresnet": {"arch": "srresnet", "options": {"n_blocks": 2, "n_feats": 16}, "size": 32,
                 "loss": {"l1": 1.0, "feature": {"weight": 0.1, "layer_ids": [2, 5], "layer_weights": [1.0, 1.0]}}},
    "rrdb": {"arch": "rrdb", "options": {"n_blocks": 1, "n_feats": 8, "growth": 8}, "size": 32},
}
BASE = {"pretrained": False, "bs": 2, "epochs": 1, "loss": "l1", "precision": "fp32", "preview_items": 1}


def train(data: Path, run: Path, resume: bool = False, **kw) -> Path:
    cfg = TrainGenConfig(data=str(data), out=str(run), **{**BASE, **kw})
    return Trainer(cfg, resume=resume, progress=False).fit()


def history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def losses(rows: list[dict[str, str]], *keys: str) -> list[float]:
    return [float(r[k]) for r in rows for k in keys]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


# --------------------------------------------------------------------------------------------------------
# cheap: the option, the helper, no graph breaks


def test_compile_is_a_run_option_of_every_training_stage():
    assert "compile" in RUN_KEYS and "compile" in CRITIC_RUN_KEYS
    base = TrainGenConfig(data="d", out="o")
    assert not base.compile
    assert config_key(base, RUN_KEYS) == config_key(base.model_copy(update={"compile": True}), RUN_KEYS)
    critic = TrainCriticConfig(data="d", out="o", compile=True)
    assert config_key(critic, CRITIC_RUN_KEYS) == config_key(TrainCriticConfig(data="d", out="o"), CRITIC_RUN_KEYS)


@pytest.mark.parametrize("command", ["train-gen", "train-critic", "train-gan", "enhance"])
def test_every_command_has_the_flag(command):
    from click.testing import CliRunner

    from crappify.cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--compile" in result.output


def test_compile_module_is_in_place_keeps_the_keys_and_runs_no_grad_calls_eagerly():
    model = build_generator("srresnet", scale=2, n_blocks=1, n_feats=8)
    keys = list(model.state_dict())
    assert compile_module(model, False, "cpu") is model and "forward" not in vars(model)
    assert compile_module(model, True, "cpu", grad_only=True) is model  # nothing compiles until a call
    assert isinstance(vars(model)["forward"], CompiledForward) and list(model.state_dict()) == keys
    forward = model.forward
    assert compile_module(model, True, "cpu") is model and model.forward is forward  # once only

    def refuse(*args, **kwargs):
        raise AssertionError("a call without autograd reached the compiled forward")

    forward.compiled = refuse
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 16, 16)
    with pytest.raises(AssertionError, match="reached the compiled"):
        model(x)


def test_no_graph_breaks_in_the_generators_and_losses():
    from torch._dynamo import explain, reset

    from srgan.losses import build_loss

    for arch, scale, size, options in (("unet-small", 1, 32, {}), ("unet-resnet18", 1, 64, {}),
                                       ("srresnet", 4, 8, {"n_blocks": 1}),
                                       ("rrdb", 4, 8, {"n_blocks": 1, "n_feats": 8, "growth": 8})):
        for residual in (False, True):
            model = build_generator(arch, scale=scale, img_size=32, residual=residual, **options)
            reset()
            found = explain(model)(torch.randn(2, 3, size, size))
            assert found.graph_break_count == 0, (arch, [b.reason for b in found.break_reasons])
    loss = build_loss({"l1": 1.0, "tv": 1e-4, "feature": {"weight": 1.0, "layer_ids": [2, 5],
                                                          "layer_weights": [1.0, 2.0]},
                       "vgg": {"weight": 1.0, "net": "vgg16", "layers": ["conv1_2"], "gram_weight": 1.0}},
                      pretrained=False)
    pred, target = torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(2, 3, 16, 16)
    for amp in (False, True):
        reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            found = explain(loss)(pred, target)
        assert found.graph_break_count == 0, [b.reason for b in found.break_reasons]


# --------------------------------------------------------------------------------------------------------
# compiling (slow on a cold cache)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a U-Net's first compilation: 70-90 s on an idle 2-core CPU with a cold cache
@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_compiled_training_step_gives_the_uncompiled_losses_weights_and_files(arch, sr_dataset, tmp_path):
    finals = {c: train(sr_dataset, tmp_path / f"compile-{c}", compile=c, **ARCHS[arch]) for c in (False, True)}
    plain, compiled = (history(finals[c].parent / "history.csv") for c in (False, True))
    assert len(plain) == len(compiled) == 1
    assert losses(compiled, "train_loss", "valid_loss") == pytest.approx(losses(plain, "train_loss", "valid_loss"),
                                                                         rel=1e-4)
    # the files are an uncompiled run's: the same keys (no `_orig_mod.`), weights to rounding
    assert_same_tensors(load_file(finals[False]), load_file(finals[True]))
    ckpt = {c: load_checkpoint(finals[c].parent / "checkpoints" / "last.pt")["model"] for c in (False, True)}
    assert_same_tensors(ckpt[False], ckpt[True])
    # ... which load as they are, into a model that is not compiled
    model = load_generator(finals[True])
    assert "forward" not in vars(model)
    assert_same_tensors(model.state_dict(), load_generator(finals[False]).state_dict())


@pytest.mark.slow
def test_a_run_resumes_across_compile_on_and_off(sr_dataset, tmp_path):
    kw = ARCHS["srresnet"]
    finals = {}
    for name, compiled in (("plain", (False, False, False)), ("switched", (False, True, False))):
        run = tmp_path / name  # 1 epoch, then extended to 2 (compile on after off), then to 3 (off after on)
        for epochs, c in zip((1, 2, 3), compiled, strict=True):
            finals[name] = train(sr_dataset, run, resume=epochs > 1, epochs=epochs, compile=c, **kw)
    rows = history(finals["switched"].parent / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert losses(rows, "train_loss", "valid_loss") == pytest.approx(
        losses(history(finals["plain"].parent / "history.csv"), "train_loss", "valid_loss"), rel=1e-4)
    assert_same_tensors(load_file(finals["plain"]), load_file(finals["switched"]))


@pytest.mark.slow
def test_a_compiled_gan_phase_gives_the_uncompiled_one_gradient_penalty_included(sr_dataset, tmp_path):
    """Per-batch switching with wgan-gp: the generator and critic steps compiled, the penalty's double backward
    run eagerly (it is not supported compiled), the critic compiled as it is frozen and unfrozen."""
    assert "compile" in GAN_RUN_KEYS
    finals = {c: train_gan(TrainGanConfig(
        data=str(sr_dataset), out=str(tmp_path / f"compile-{c}"), generator_arch="srresnet",
        generator_options=ARCHS["srresnet"]["options"], critic_arch="patch", critic_options={"nf": 8, "n_blocks": 2},
        loss="l1", pretrained=False, adv_loss="wgan-gp", switching="per-batch", size=32, bs=2, iters=2,
        preview_items=1, precision="fp32", compile=c), progress=False) for c in (False, True)}
    plain, compiled = (history(finals[c].parent / "history.csv") for c in (False, True))
    assert losses(compiled, "gen_loss", "crit_loss") == pytest.approx(losses(plain, "gen_loss", "crit_loss"), rel=1e-3)
    assert_same_tensors(load_file(finals[False]), load_file(finals[True]))


def blurred_preds(data: Path, run: Path) -> None:
    """'Generator outputs' for train-critic: each HR, blurred."""
    for split, pairs in read_dataset(data)[0].items():
        for pair in pairs:
            dst = run / "preds" / split / f"{pair.id}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), cv2.GaussianBlur(cv2.imread(str(pair.hr)), (0, 0), 2.0))


@pytest.mark.slow
def test_a_compiled_critic_trains_as_the_uncompiled_one(sr_dataset, tmp_path):
    finals = {}
    for c in (False, True):
        run = tmp_path / f"compile-{c}"
        blurred_preds(sr_dataset, run)
        finals[c] = train_critic(TrainCriticConfig(data=str(sr_dataset), out=str(run), arch="patch",
                                                   options={"nf": 8, "n_blocks": 2}, size=32, bs=2, epochs=1,
                                                   precision="fp32", compile=c), progress=False)
    plain, compiled = (history(finals[c].parent / "critic-history.csv") for c in (False, True))
    assert losses(compiled, "train_loss", "valid_loss") == pytest.approx(losses(plain, "train_loss", "valid_loss"),
                                                                         rel=1e-4)
    assert_same_tensors(load_file(finals[False]), load_file(finals[True]))
    assert "forward" not in vars(load_critic(finals[True]))


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_generator("srresnet", scale=4, n_blocks=1, n_feats=8, residual=True)
    with torch.no_grad():
        model.gain.fill_(0.5)  # not the bicubic baseline alone
    path = tmp_path_factory.mktemp("compile-model") / "generator.safetensors"
    save_generator(model, path, data_scale=model.crappify_spec["scale"])
    return path


PHOTO_SIZES = ((30, 30), (20, 27), (41, 17), (10, 12))  # covered exactly by 16 px tiles; not; not; under a tile


def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in PHOTO_SIZES]


def test_fixed_tiles_give_every_forward_pass_one_shape(sr_model):
    # what --compile does to the tiling, without compiling: `batch` tiles of `tile` px in every pass
    model = load_generator(sr_model)
    shapes = set()
    model.register_forward_pre_hook(lambda _m, args: shapes.add(tuple(args[0].shape)))
    plain, fixed = TiledInference(model, tile=16, batch=3), TiledInference(model, tile=16, batch=3, fixed_tiles=True)
    for photo in photos():
        assert fixed(photo).shape == (photo.shape[0] * 4, photo.shape[1] * 4, 3)
    assert shapes == {(3, 3, 16, 16)}  # short last batches filled up, a small photo padded up to a tile
    first = photos()[0]  # a photo the tiles cover exactly is tiled the same either way
    assert np.array_equal(plain(first), fixed(first))


@pytest.mark.slow
def test_compiled_tiled_inference_and_enhance_give_the_uncompiled_output(sr_model, tmp_path):
    from srgan.inference import load_inference

    same_tiles = load_inference(sr_model, tile=16, batch=3, fixed_tiles=True)
    compiled = load_inference(sr_model, tile=16, batch=3, compile=True)
    assert compiled.fixed_tiles and isinstance(vars(compiled.model)["forward"], CompiledForward)
    for photo in photos():
        assert np.abs(compiled(photo).astype(int) - same_tiles(photo)).max() <= 1

    # enhance(compile=True) writes what enhance writes (photos the 16 px tiles cover exactly)
    src = tmp_path / "photos"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), photos()[0])
    cv2.imwrite(str(src / "b.png"), photos()[0][::-1].copy())
    outs = {}
    for c in (False, True):
        res = enhance([src], sr_model, tmp_path / f"out-{c}", tile=16, batch=3, device="cpu", precision="fp32",
                      progress=False, compile=c)
        assert len(res.written) == 2
        outs[c] = [cv2.imread(str(p)) for p in sorted(res.written)]
    for a, b in zip(outs[False], outs[True], strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1
