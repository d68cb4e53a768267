"""BasicSR's layout, out and in: rrdb and compact generators trained here load in spandrel (so chaiNNer) as the same
architecture and scale with the same outputs; files spandrel's own classes make start train-gen and train-gan;
what cannot be represented, and hostile files, are one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image
from safetensors.torch import save_file

from srgan.basicsr import load_basicsr, read_basicsr
from srgan.checkpoint import load_generator, read_generator_meta, save_critic, save_generator
from srgan.critics import build_critic
from srgan.export import exportable
from srgan.generators import build_generator

spandrel = pytest.importorskip("spandrel")

TINY = {"compact": {"n_feats": 8, "n_conv": 2}, "rrdb": {"n_blocks": 1, "n_feats": 8, "normalize": "none"}}


def ours(path: Path, arch: str, scale: int, seed: int = 0, **options) -> Path:
    torch.manual_seed(seed)
    model = build_generator(arch, scale=scale, **{**TINY[arch], **options})
    with torch.no_grad():  # PReLU slopes and biases away from their initial values, so every tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_generator(model, path, data_scale=scale)
    return path


def spandrel_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spandrel.ModelLoader().load_from_file(str(path))


def test_compact_is_real_esrgans_size_at_its_defaults():
    model = build_generator("compact", scale=4)
    assert 0.6e6 < sum(p.numel() for p in model.parameters()) < 0.65e6
    assert model(torch.rand(1, 3, 9, 11)).shape == (1, 3, 36, 44)


@pytest.mark.parametrize("arch, scale", [("compact", 2), ("compact", 4), ("rrdb", 2), ("rrdb", 4)])
def test_exported_file_loads_in_spandrel_as_the_same_model_with_the_same_outputs(tmp_path, arch, scale):
    model_file = ours(tmp_path / "g.safetensors", arch, scale)
    code, out, err = run_main("export", "-m", model_file, "--pth", tmp_path / "g.pth", "--safetensors",
                              tmp_path / "g2.safetensors", "--verify", "--quiet")
    assert code == 0, err
    assert out.count("verify: spandrel") == 2, out
    wrapper = exportable(model_file)  # our whole contract: [0, 1] RGB in and out
    x = torch.rand(2, 3, 19, 26)
    with torch.no_grad():
        want = wrapper(x)
    for name in ("g.pth", "g2.safetensors"):
        desc = spandrel_load(tmp_path / name)
        assert desc.architecture.id == {"compact": "Compact", "rrdb": "ESRGAN"}[arch]
        assert desc.scale == scale and desc.input_channels == desc.output_channels == 3
        with torch.no_grad():
            got = desc.model.eval()(x).clamp(0, 1)
        assert got.shape == (2, 3, 19 * scale, 26 * scale)
        assert (got - want).abs().max() < 1e-5
    assert set(torch.load(tmp_path / "g.pth", weights_only=True)) == {"params"}  # BasicSR's key


def test_a_spandrel_loaded_export_reads_back_as_the_same_generator(tmp_path):
    model_file = ours(tmp_path / "g.safetensors", "rrdb", 4, seed=3)
    run_main("export", "-m", model_file, "--pth", tmp_path / "g.pth", "--quiet")
    rng = torch.get_rng_state()
    back = load_basicsr(tmp_path / "g.pth")
    assert torch.equal(torch.get_rng_state(), rng)  # built on the meta device, made real holding the file's weights
    assert back.crappify_spec["options"] == read_generator_meta(model_file)["spec"]["options"]
    assert back.crappify_spec["arch"] == "rrdb" and back.crappify_spec["scale"] == 4
    saved = load_generator(model_file).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in back.state_dict().items())


@pytest.mark.parametrize("arch, options, why", [
    ("unet-small", {"img_size": 64}, "unet-small has no BasicSR"),
    ("rrdb", {"normalize": "imagenet"}, "ImageNet-normalised"),
    ("rrdb", {"residual": True}, "bicubic skip"),
    ("rrdb", {"growth": 16}, "growth 32 only"),
])
def test_a_model_without_basicsrs_layout_is_one_line_pointing_to_onnx(tmp_path, arch, options, why):
    torch.manual_seed(0)
    if arch == "unet-small":
        model = build_generator(arch, pretrained=False, **options)
    else:
        model = build_generator(arch, scale=2, **{**TINY["rrdb"], **options})
    save_generator(model, tmp_path / "g.safetensors", data_scale=2)
    code, _, err = run_main("export", "-m", tmp_path / "g.safetensors", "--torchscript", tmp_path / "g.pt",
                            "--pth", tmp_path / "g.pth", "--quiet")
    assert code == 1 and err.strip().count("\n") == 0 and why in err and "--onnx" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]  # refused before anything was written


def _spandrel_state(arch: str, scale: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(1)
    net = (ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=2, scale=scale) if arch == "rrdb"
           else Compact(num_feat=8, num_conv=3, upscale=scale))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval(), {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("arch, scale, wrap, suffix", [
    ("rrdb", 4, "params_ema", ".pth"),  # Real-ESRGAN's release files
    ("rrdb", 2, "module.", ".pth"),  # DataParallel's prefix, ESRGAN's original numbering (spandrel's class)
    ("compact", 3, "params", ".pth"),
    ("compact", 4, None, ".safetensors"),
])
def test_a_file_spandrels_classes_make_reads_as_ours_with_the_same_outputs(tmp_path, arch, scale, wrap, suffix):
    net, state = _spandrel_state(arch, scale)
    path = tmp_path / f"released{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif wrap == "module.":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save({wrap: state, "iter": torch.tensor(5)}, path)
    model = load_basicsr(path).eval()
    assert model.crappify_spec["arch"] == arch and model.crappify_spec["scale"] == scale
    x = torch.rand(1, 3, 13, 10)
    with torch.no_grad():
        assert (model.core(x) - net(x)).abs().max() < 1e-6


def test_train_gen_init_and_train_gan_generator_start_from_a_released_model(sr_dataset, tmp_path):
    from srgan.train_gan import TrainGanConfig, train_gan
    from srgan.train_gen import Trainer, TrainGenConfig

    net, state = _spandrel_state("rrdb", 4)
    released = tmp_path / "RealESRGAN_x4plus_tiny.pth"
    torch.save({"params_ema": state}, released)
    run = tmp_path / "run"
    cfg = TrainGenConfig(data=str(sr_dataset), out=str(run), init=str(released), pretrained=False, size=32, bs=2,
                         epochs=1, loss="l1", preview_items=0, precision="fp32")
    trainer = Trainer(cfg, progress=False)
    assert trainer.cfg.arch == "rrdb" and trainer.cfg.lr == 1e-4  # the file's arch; the fine-tuning rate
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():  # the run starts from the released weights
        assert (trainer._model()[0].core(x) - net(x)).abs().max() < 1e-6
    trainer.fit()
    spec = read_generator_meta(run / "generator.safetensors")["spec"]
    assert spec["arch"] == "rrdb" and spec["options"]["normalize"] == "none" and spec["options"]["n_blocks"] == 2

    gan = tmp_path / "gan-run"
    gan.mkdir()
    torch.manual_seed(0)
    save_critic(build_critic("patch", nf=8, n_blocks=2), gan / "critic.safetensors")
    final = train_gan(TrainGanConfig(data=str(sr_dataset), out=str(gan), generator=str(released), iters=2,
                                     switching="fixed", size=32, bs=2, loss="l1", preview_items=0,
                                     precision="fp32"), progress=False)
    assert read_generator_meta(final)["spec"]["arch"] == "rrdb"


def test_init_that_disagrees_with_the_config_or_the_data_is_one_line(sr_dataset, tmp_path):
    _, state = _spandrel_state("compact", 2)
    released = tmp_path / "x2.pth"
    torch.save({"params": state}, released)
    base = ["train-gen", sr_dataset, "-o", tmp_path / "run", "--init", released, "--no-pretrained"]
    code, _, err = run_main(*base, "--arch", "rrdb")
    assert code == 2 and "holds a compact generator, not the configured rrdb" in err, err
    code, _, err = run_main(*base)  # the dataset is x4
    assert code == 2 and "upsamples x2" in err and "needs x4" in err, err
    assert not (tmp_path / "run" / "generator.safetensors").exists()


def _hostile(tmp_path: Path, name: str, state: dict) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_hostile_or_foreign_files_are_one_line_naming_the_file(tmp_path):
    from crappify.errors import CrappifyError

    _, good = _spandrel_state("rrdb", 4)
    cases = {
        "pickle.pth": None,  # pickled code
        "x2plus.pth": {"params_ema": {"conv_first.weight": torch.zeros(8, 12, 3, 3), "conv_first.bias": torch.zeros(8),
                                      "body.0.rdb1.conv1.weight": torch.zeros(32, 8, 3, 3)}},
        "shape.pth": {k: (torch.zeros(3, 3) if k == "model.1.sub.2.weight" else v) for k, v in good.items()},
        "other.pth": {"encoder.weight": torch.zeros(4)},
        "huge.pth": {"body.0.weight": torch.zeros(4096, 3, 3, 3), "body.0.bias": torch.zeros(4096),
                     "body.1.weight": torch.zeros(4096), "body.2.weight": torch.zeros(12, 4096, 3, 3),
                     "body.2.bias": torch.zeros(12)},
        "strings.pth": {"params": {"body.0.weight": "x"}},
    }
    for name, state in cases.items():
        if state is None:
            path = tmp_path / name
            import pickle

            path.write_bytes(pickle.dumps(Image.new("RGB", (2, 2))))
        else:
            path = _hostile(tmp_path, name, state)
        with pytest.raises(CrappifyError) as exc:
            load_basicsr(path)
        assert str(path) in str(exc.value) and "\n" not in str(exc.value), (name, exc.value)


def test_enhance_runs_a_compact_file_and_a_compact_run_trains(sr_dataset, tmp_path, photo_maker):
    from srgan.train_gen import Trainer, TrainGenConfig

    run = tmp_path / "run"
    Trainer(TrainGenConfig(data=str(sr_dataset), out=str(run), arch="compact", options={"n_feats": 8, "n_conv": 2},
                           pretrained=False, size=32, bs=2, epochs=1, loss="l1", preview_items=0,
                           precision="fp32"), progress=False).fit()
    Image.fromarray(photo_maker(0, 40)).save(tmp_path / "in.png")
    code, _, err = run_main("enhance", tmp_path / "in.png", "-m", run, "-o", tmp_path / "big", "--quiet")
    assert code == 0, err
    with Image.open(tmp_path / "in.png") as small, Image.open(tmp_path / "big" / "in.png") as big:
        assert big.size == (small.size[0] * 4, small.size[1] * 4)
        assert np.asarray(big).std() > 5
    code, _, err = run_main("export", "-m", run, "--pth", tmp_path / "c.pth", "--quiet")
    assert code == 0 and spandrel_load(tmp_path / "c.pth").scale == 4, err
    assert read_basicsr(tmp_path / "c.pth")[:3] == ("compact", 4, {"n_feats": 8, "n_conv": 2, "normalize": "none"})
    # enhance (and evaluate, through the same loader) run a BasicSR-layout file as they run ours: the same pixels
    code, _, err = run_main("enhance", tmp_path / "in.png", "-m", tmp_path / "c.pth", "-o", tmp_path / "big2",
                            "--quiet")
    assert code == 0, err
    with Image.open(tmp_path / "big" / "in.png") as a, Image.open(tmp_path / "big2" / "in.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_released_x4_file_is_evaluated_on_a_benchmark_folder(tmp_path, photo_maker):
    from srgan.evaluate import EvaluateConfig, evaluate

    _, state = _spandrel_state("compact", 4)
    released = tmp_path / "realesr-tiny.pth"
    torch.save({"params": state}, released)
    hr = tmp_path / "Set2" / "HR"
    hr.mkdir(parents=True)
    for k, side in enumerate((66, 71)):
        Image.fromarray(photo_maker(k, side)).save(hr / f"img{k}.png")
    evaluate(EvaluateConfig(hr=str(hr), scale=4, models=[str(released)], names=["released"], out=str(tmp_path / "r"),
                            device="cpu", lpips=False, grids=0), progress=False)
    assert "released" in (tmp_path / "r" / "report.md").read_text()
