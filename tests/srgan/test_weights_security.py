"""Files from outside are not trusted: no pickled code runs, model metadata is bounded, bad files give one line.

- Pretrained weights (torchvision's cache, which the offline message tells users to fill by hand; a local
  `--weights` file; LPIPS's backbone) are read with `weights_only=True`: a file whose unpickling would run code
  is refused with one line naming it, and the code never runs (a marker file it would create stays absent).
- A generator/critic file's metadata (spec, normalisation, extra) is checked for types and ranges, and the spec is
  checked against the file's tensors before a model is allocated; a plain safetensors state dict, a missing
  entry or malformed JSON is one line naming the file, never a KeyError/JSONDecodeError traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_enhance import run_main

from crappify.errors import CrappifyError
from srgan.checkpoint import load_critic, load_generator, read_generator_meta, save_critic, save_generator
from srgan.critics import build_critic
from srgan.generators import build_generator
from srgan.weights import WeightsError, read_state_dict, torchvision_cache_path


class _Payload:
    """Unpickling this creates `marker` (an `open(marker, "w")` call): the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def hostile_weights(path: Path, marker: Path) -> Path:
    """A torch file that looks like a state dict but runs code (creates `marker`) when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    return path


def assert_refused(exc: BaseException, path: Path, marker: Path) -> None:
    message = str(exc)
    assert isinstance(exc, WeightsError) and str(path) in message and "pickled" in message, message
    assert "\n" not in message
    assert not marker.exists(), "unpickling ran the file's code"


def test_the_hostile_file_really_runs_code_when_unpickled(tmp_path):
    # the fixture is what it claims to be: torch.hub's loader (weights_only=False) would run it
    marker = tmp_path / "ran"
    path = hostile_weights(tmp_path / "w.pth", marker)
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_local_weights_file_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = hostile_weights(tmp_path / "resnet18.pth", marker)
    for build in (lambda: read_state_dict(path),
                  lambda: build_generator("unet-resnet18", img_size=32, pretrained=True, weights=path),
                  lambda: build_generator("srresnet", scale=2, n_blocks=1, pretrained=True, weights=path)):
        with pytest.raises(WeightsError) as err:
            build()
        assert_refused(err.value, path, marker)


def test_torchvision_cache_file_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "ran"
    path = hostile_weights(torchvision_cache_path("ResNet18_Weights.IMAGENET1K_V1"), marker)
    assert str(tmp_path) in str(path)
    with pytest.raises(WeightsError) as err:
        build_generator("unet-resnet18", img_size=32, pretrained=True)
    assert_refused(err.value, path, marker)
    assert "download.pytorch.org" in str(err.value)  # where the genuine file comes from


def test_vgg_loss_weights_with_pickled_code_are_refused(tmp_path, monkeypatch):
    from srgan.losses import build_loss

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "ran"
    cached = hostile_weights(torchvision_cache_path("VGG16_BN_Weights.IMAGENET1K_V1"), marker)
    with pytest.raises(WeightsError) as err:
        build_loss("feature", pretrained=True)
    assert_refused(err.value, cached, marker)
    local = hostile_weights(tmp_path / "vgg19.pth", marker)
    with pytest.raises(WeightsError) as err:
        build_loss("vgg19", weights={"vgg19": str(local)})
    assert_refused(err.value, local, marker)


def test_hugging_face_cache_file_with_pickled_code_is_refused(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    marker = tmp_path / "ran"
    path = hostile_weights(repo / "snapshots" / ("0" * 40) / "pytorch_model.bin", marker)
    with pytest.raises(WeightsError) as err:
        build_generator("unet-timm:test_resnet", img_size=32, pretrained=True)
    assert_refused(err.value, path, marker)


def test_lpips_backbone_with_pickled_code_is_refused(tmp_path, monkeypatch):
    from srgan.evaluate import lpips_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "ran"
    cached = hostile_weights(torchvision_cache_path("AlexNet_Weights.IMAGENET1K_V1"), marker)
    model, reason = lpips_model("alex")
    assert model is None and str(cached) in reason and "pickled" in reason
    assert not marker.exists()


def test_plain_tensor_files_still_load(tmp_path, monkeypatch):
    # the guard refuses code, not weights: a genuine torch state dict in the cache is used
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = torchvision_cache_path("ResNet18_Weights.IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    encoder = build_generator("unet-resnet18", img_size=32, pretrained=True)[0]
    assert torch.equal(encoder[0].weight, saved["conv1.weight"])
    renamed = tmp_path / "weights.bin"  # safetensors content under another name is recognised
    save_file({"a": torch.ones(2)}, str(renamed))
    assert torch.equal(read_state_dict(renamed)["a"], torch.ones(2))


def test_lpips_builds_from_a_plain_cached_backbone(tmp_path, monkeypatch):
    import numpy as np
    import torchvision

    from srgan.evaluate import lpips_distance, lpips_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = torchvision_cache_path("SqueezeNet1_1_Weights.IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    model, reason = lpips_model("squeeze")
    assert model is not None and reason is None
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert abs(lpips_distance(model, a, a)) < 1e-6 < lpips_distance(model, a, 255 - a)


def test_cli_refuses_a_weights_file_with_pickled_code_in_one_line(tmp_path, sr_dataset):
    marker = tmp_path / "ran"
    path = hostile_weights(tmp_path / "encoder.pth", marker)
    code, _, err = run_main("train-gen", sr_dataset, "-o", tmp_path / "run", "--arch", "unet-resnet18",
                            "--weights", path, "--epochs", "1", "--device", "cpu", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]
    assert code != 0 and len(lines) == 1 and str(path) in lines[0] and "pickled" in lines[0], err
    assert "Traceback" not in err and not marker.exists()


# --------------------------------------------------------------------------------------------------------
# model files: metadata checked, spec checked against the tensors, one line naming the file


def crafted(src: Path, dst: Path, edit) -> Path:
    """`src`'s tensors with its metadata (a dict of strings) changed by `edit` (which may also return None)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    save_file(load_file(str(src)), str(dst), metadata=edit(meta))
    return dst


def _spec(options: dict | None = None, **changes):
    """An edit that changes spec entries and merges `options` into the spec's options."""
    def edit(meta):
        spec = json.loads(meta["spec"])
        return {**meta, "spec": json.dumps({**spec, **changes, "options": {**spec["options"], **(options or {})}})}
    return edit


def _options(value):
    def edit(meta):
        return {**meta, "spec": json.dumps({**json.loads(meta["spec"]), "options": value})}
    return edit


BAD_GENERATOR_META = {
    "plain state dict": (lambda meta: None, "not a crappify generator file"),
    "spec missing": (lambda meta: {k: v for k, v in meta.items() if k != "spec"}, "no 'spec' entry"),
    "normalization missing": (lambda meta: {k: v for k, v in meta.items() if k != "normalization"},
                              "no 'normalization' entry"),
    "spec not JSON": (lambda meta: {**meta, "spec": "{arch: srresnet"}, "'spec' is not valid JSON"),
    "extra not JSON": (lambda meta: {**meta, "extra": "[1, 2"}, "'extra' is not valid JSON"),
    "spec not a mapping": (lambda meta: {**meta, "spec": "[1, 2]"}, "spec must be a mapping"),
    "options not a mapping": (_options([1]), "options must be a mapping"),
    "huge n_feats": (_spec(options={"n_feats": 10 ** 7}), "option n_feats = 10000000 is out of range"),
    "huge img_size": (_spec(img_size=10 ** 9), "img_size must be an integer in 1..2048"),
    "huge scale": (_spec(scale=4096), "scale must be an integer"),
    "scale not an integer": (_spec(scale="2"), "scale must be an integer"),
    "unknown option": (_spec(options={"rm": "-rf"}), "unknown option(s) rm"),
    "option clashing with the builder": (_spec(options={"pretrained": True}), "cannot be built"),
    "unknown arch": (_spec(arch="nope"), "unknown generator 'nope'"),
    # within every bound, but not what the file holds: refused from the header, before 20 M parameters are built
    "spec larger than the weights": (_spec(options={"n_feats": 256, "n_blocks": 16}), "do not match"),
    "normalization malformed": (lambda meta: {**meta, "normalization": "[[0, 0, 0], [0, 1, 1]]"}, "normalization"),
    "huge data_scale": (lambda meta: {**meta, "extra": json.dumps({"data_scale": 10 ** 6})},
                        "data_scale must be an integer in 1..16"),
    # past the JSON parser's recursion limit, and deep enough to hurt anything that walks or formats it
    "spec nested past the parser": (lambda meta: {**meta, "spec": "[" * 200_000 + "]" * 200_000}, "too deeply"),
    "extra nested past the parser": (lambda meta: {**meta, "extra": '{"a":' * 200_000 + "1" + "}" * 200_000},
                                     "too deeply"),
    "options nested deeply": (_spec(options={"depths": json.loads("[" * 500 + "]" * 500)}), "too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_GENERATOR_META))
def test_bad_generator_metadata_is_one_line_naming_the_file(sr_file, tmp_path, case):
    from srgan.inference import load_inference

    edit, text = BAD_GENERATOR_META[case]
    path = crafted(sr_file, tmp_path / "bad.safetensors", edit)
    start = time.monotonic()
    for load in (load_generator, load_inference):
        with pytest.raises(CrappifyError) as err:
            load(path)
        message = str(err.value)
        assert str(path) in message and text in message and "\n" not in message, message
    assert time.monotonic() - start < 2


def test_model_files_are_byte_identical_whatever_process_writes_them(tmp_path):
    """Metadata keys in a canonical order: train-critic and train-gan key their checkpoints on these bytes."""
    script = ("import sys, torch; from srgan.generators import build_generator; "
              "from srgan.checkpoint import save_generator; torch.manual_seed(0); "
              "save_generator(build_generator('srresnet', scale=2, n_blocks=1, n_feats=4), sys.argv[1], "
              "data_scale=2, extra={'b': 1, 'a': 2, 'epoch': 3})")
    files = [tmp_path / f"g{i}.safetensors" for i in range(3)]
    for i, path in enumerate(files):  # a different hash seed each time, as separate runs have
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(i)})
    assert len({p.read_bytes() for p in files}) == 1
    model = load_generator(files[0])
    assert read_generator_meta(files[0])["extra"]["data_scale"] == 2 and model.crappify_spec["arch"] == "srresnet"


def test_critic_metadata_is_checked_too(tmp_path):
    torch.manual_seed(0)
    good = tmp_path / "critic.safetensors"
    save_critic(build_critic("patch", nf=4, n_blocks=2), good)
    assert type(load_critic(good)).__name__ == "PatchDiscriminator"
    cases = {
        "huge nf": (_spec(options={"nf": 10 ** 6}), "option nf"),
        "other widths": (_spec(options={"nf": 512, "n_blocks": 6}), "do not match"),
        "missing spec": (lambda meta: {k: v for k, v in meta.items() if k != "spec"}, "no 'spec' entry"),
        "plain state dict": (lambda meta: None, "not a crappify critic file"),
    }
    for name, (edit, text) in cases.items():
        path = crafted(good, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(CrappifyError) as err:
            load_critic(path)
        assert str(path) in str(err.value) and text in str(err.value), (name, str(err.value))


def test_good_files_still_load_and_keep_their_spec(sr_file, tmp_path):
    assert read_generator_meta(sr_file)["extra"]["data_scale"] == 2
    assert type(load_generator(sr_file)).__name__ == "SRResNet"
    # a U-Net trained at a large size is rebuilt at a small one (same layers) and keeps its recorded size
    torch.manual_seed(0)
    unet = build_generator("unet-small", img_size=320).eval()
    path = tmp_path / "unet.safetensors"
    save_generator(unet, path, data_scale=1)
    loaded = load_generator(path)
    assert loaded.crappify_spec == unet.crappify_spec
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(unet(x), loaded(x))


def test_cli_enhance_and_export_with_a_crafted_model_are_one_line(sr_file, tmp_path, photo_maker):
    from PIL import Image

    Image.fromarray(photo_maker(0, 40)).save(tmp_path / "in.png")
    for name, (edit, text) in {"plain": BAD_GENERATOR_META["plain state dict"],
                               "huge": BAD_GENERATOR_META["huge img_size"],
                               "json": BAD_GENERATOR_META["spec not JSON"]}.items():
        path = crafted(sr_file, tmp_path / f"{name}.safetensors", edit)
        for args in (["enhance", tmp_path / "in.png", "-m", path, "-o", tmp_path / "out", "--quiet"],
                     ["export", "-m", path, "--torchscript", tmp_path / "out.pt"]):
            code, _, err = run_main(*args)
            lines = [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]
            assert code != 0 and len(lines) == 1 and str(path) in lines[0] and text in lines[0], err
            assert "Traceback" not in err
