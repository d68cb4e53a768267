"""interpolate: alpha·A + (1 − alpha)·B of two generator files, refused for files that are not the same model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import run_main
from PIL import Image
from safetensors.torch import load_file

from srgan.checkpoint import load_generator, read_generator_meta, save_generator
from srgan.generators import build_generator
from srgan.interpolate import interpolate

TINY = {"n_blocks": 1, "n_feats": 8}


def tiny_file(path: Path, seed: int, arch: str = "srresnet", scale: int = 2, data_scale: int = 2,
              **options) -> Path:
    torch.manual_seed(seed)
    save_generator(build_generator(arch, scale=scale, pretrained=False, **(options or TINY)), path,
                   data_scale=data_scale)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("blend")
    return tiny_file(root / "gan.safetensors", 1), tiny_file(root / "pre.safetensors", 2)


def outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_generator(path)(x)


def test_alpha_one_gives_a_and_zero_gives_b_exactly(pair, tmp_path):
    a, b = pair
    x = torch.rand(1, 3, 13, 17)
    for alpha, same in ((1.0, a), (0.0, b)):
        out = interpolate(a, b, alpha, tmp_path / f"c{alpha}.safetensors")
        assert torch.equal(outputs(out, x), outputs(same, x))
        want, got = load_file(str(same)), load_file(str(out))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(outputs(a, x), outputs(b, x))  # the two ends differ, so the checks above mean something


def test_half_is_the_parameter_mean_and_the_file_says_what_it_blends(pair, tmp_path):
    a, b = pair
    out = interpolate(a, b, 0.5, tmp_path / "half.safetensors")
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(out))
    for key, value in sc.items():
        if value.is_floating_point():
            assert torch.allclose(value, (sa[key] + sb[key]) / 2, rtol=0, atol=1e-7), key
        else:  # a counter (BatchNorm's num_batches_tracked) is taken whole, from A at alpha 0.5
            assert torch.equal(value, sa[key]), key
    meta = read_generator_meta(out)
    assert meta["spec"] == read_generator_meta(a)["spec"]
    assert meta["extra"]["alpha"] == 0.5 and meta["extra"]["data_scale"] == 2
    assert meta["extra"]["blend_of"] == [str(a.resolve()), str(b.resolve())]


def test_weight_normed_unet_blends_every_parameter(tmp_path):
    """fastai's weight norm keeps g and v as parameters: both are blended, and the blend loads and runs."""
    a = tiny_file(tmp_path / "a.safetensors", 3, arch="unet-small", scale=1, img_size=64)
    b = tiny_file(tmp_path / "b.safetensors", 4, arch="unet-small", scale=1, img_size=64)
    out = interpolate(a, b, 0.25, tmp_path / "c.safetensors")
    sa, sb, sc = load_file(str(a)), load_file(str(b)), load_file(str(out))
    assert any(k.endswith("weight_g") for k in sc)
    blended = [k for k, v in sc.items() if v.is_floating_point() and not k.endswith(("weight_u", "weight_v"))]
    assert len(blended) > 100
    for key in blended:  # spectral norm's singular vectors are re-estimated (the next test), not blended
        assert torch.allclose(sc[key], 0.25 * sa[key] + 0.75 * sb[key], rtol=0, atol=1e-6), key
    y = outputs(out, torch.rand(1, 3, 64, 96))
    assert y.shape == (1, 3, 64, 96) and torch.isfinite(y).all()


def test_spectral_norm_vectors_are_those_of_the_blended_weight(tmp_path):
    """In eval mode a spectral-normed weight is divided by u·Wv as stored: after a blend that must be the blended
    weight's largest singular value, not a mix of the two ends' vectors."""
    a = tiny_file(tmp_path / "a.safetensors", 5, arch="unet-small", scale=1, img_size=64, norm_type="spectral")
    b = tiny_file(tmp_path / "b.safetensors", 6, arch="unet-small", scale=1, img_size=64, norm_type="spectral")
    model = load_generator(interpolate(a, b, 0.5, tmp_path / "c.safetensors"))
    checked = 0
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook).__name__ == "SpectralNorm":
                w = hook.reshape_weight_to_matrix(module.weight_orig.detach())
                sigma = module.weight_u @ (w @ module.weight_v)
                assert math.isclose(float(sigma), float(torch.linalg.matrix_norm(w, ord=2)), rel_tol=1e-3)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("other, text", [
    ({"arch": "srresnet", "scale": 4}, "model scale x2 vs x4"),
    ({"arch": "srresnet", "n_blocks": 1, "n_feats": 16}, "option n_feats = 8 vs 16"),
    ({"arch": "srresnet", "data_scale": 3}, "data of scale x2 vs x3"),
    ({"arch": "rrdb", "n_blocks": 1, "n_feats": 8, "growth": 4}, "architecture srresnet vs rrdb"),
])
def test_files_of_different_models_are_refused_in_one_line(pair, tmp_path, other, text):
    other = dict(other)
    arch, scale, data_scale = other.pop("arch"), other.pop("scale", 2), other.pop("data_scale", 2)
    b = tiny_file(tmp_path / "other.safetensors", 7, arch=arch, scale=scale, data_scale=data_scale, **other)
    code, _, err = run_main("interpolate", pair[0], b, "--alpha", "0.5", "-o", tmp_path / "c.safetensors")
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and "not the same kind of model" in err and text in err, err
    assert str(pair[0]) in err and str(b) in err
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "nan", "inf"])
def test_alpha_outside_zero_to_one_is_one_line(pair, tmp_path, alpha):
    code, _, err = run_main("interpolate", *pair, "--alpha", alpha, "-o", tmp_path / "c.safetensors")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "--alpha" in err, err
    assert not (tmp_path / "c.safetensors").exists()


def test_cli_writes_a_blend_and_never_replaces_a_file_unasked(pair, tmp_path):
    a, b = pair
    out = tmp_path / "models" / "blend.safetensors"
    code, stdout, err = run_main("interpolate", a, b, "--alpha", "0.8", "-o", out)
    assert code == 0 and out.is_file() and "blend:" in stdout, err
    assert read_generator_meta(out)["extra"]["alpha"] == 0.8
    first = out.read_bytes()

    out.write_bytes(b"the user's")
    code, _, err = run_main("interpolate", a, b, "--alpha", "0.3", "-o", out)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"the user's"
    code, _, err = run_main("interpolate", a, b, "--alpha", "0.8", "-o", out, "--overwrite")
    assert code == 0 and out.read_bytes() == first, err  # the same blend, byte for byte

    before = a.read_bytes()
    code, _, err = run_main("interpolate", a, b, "--alpha", "0.5", "-o", a, "--overwrite")
    assert code == 2 and "one of the models to blend" in err and a.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["blend.safetensors"]  # no temporaries left


def test_enhance_and_export_run_the_blend(pair, tmp_path, photo_maker):
    from srgan.export import export_torchscript

    out = interpolate(*pair, 0.7, tmp_path / "blend.safetensors")
    Image.fromarray(photo_maker(0, 40)).save(tmp_path / "in.png")
    code, _, err = run_main("enhance", tmp_path / "in.png", "-m", out, "-o", tmp_path / "big", "--quiet")
    assert code == 0, err
    with Image.open(tmp_path / "in.png") as small, Image.open(tmp_path / "big" / "in.png") as big:
        assert big.size == (small.size[0] * 2, small.size[1] * 2)
    traced = torch.jit.load(str(export_torchscript(out, tmp_path / "blend.pt")))
    x = torch.rand(1, 3, 9, 14)
    assert traced(x).shape == (1, 3, 18, 28)
