"""enhance: odd inputs keep mode/orientation/alpha, folders keep their layout, bad files are skipped, CLI errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image

from srgan.checkpoint import save_generator
from srgan.enhance import collect_inputs, enhance_files, read_input
from srgan.generators import build_generator
from srgan.inference import TiledInference, load_inference


@pytest.fixture(scope="module")
def engine(sr_file) -> TiledInference:
    return load_inference(sr_file, tile=0)


def opened(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


@pytest.mark.parametrize("kind, mode", [("rgba", "RGBA"), ("grey8", "L"), ("grey16", "L"), ("rgb16", "RGB"),
                                        ("palette", "RGB"), ("palette_t", "RGBA"), ("cmyk", "RGB"), ("exif6", "RGB")])
def test_odd_inputs_come_out_with_the_right_mode_and_size(engine, odd_files, tmp_path, kind, mode):
    src = odd_files.paths[kind]
    res = enhance_files(engine, [(src, Path(src.name))], tmp_path, 2, progress=False)
    assert not res.failed and len(res.written) == 1
    out = opened(res.written[0])
    h, w = odd_files.expected[kind].shape[:2]  # upright size
    assert out.mode == mode and out.size == (2 * w, 2 * h)


def test_alpha_is_resized_and_kept(engine, odd_files, tmp_path):
    src = odd_files.paths["rgba"]
    res = enhance_files(engine, [(src, Path("a.png"))], tmp_path, 2, progress=False)
    alpha = np.asarray(opened(res.written[0]))[..., 3]
    w = odd_files.expected["rgba"].shape[1]
    assert alpha[:, : 2 * w // 3 - 4].max() == 0  # the transparent left third stays transparent
    assert alpha[:, 2 * w // 2 + 4:].min() == 255


def test_exif_orientation_is_applied_before_enhancing(engine, odd_files, tmp_path):
    src = odd_files.paths["exif6"]
    upright = odd_files.expected["exif6"]
    assert read_input(src).rgb.shape == upright.shape
    res = enhance_files(engine, [(src, Path("r.png"))], tmp_path, 2, progress=False)
    got = np.asarray(opened(res.written[0])).astype(int)
    want = engine(upright).astype(int)
    assert np.abs(got - want).mean() < 3  # the JPEG's decode differs a little from the fixture's, not the layout


def test_folder_keeps_layout_skips_corrupt_and_existing(engine, photo_dir, odd_files, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photo_dir, src)
    shutil.copy(odd_files.root / "sub" / "truncated.jpg", src / "a" / "broken.jpg")
    (src / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    items = collect_inputs([src], out)
    assert all(p.suffix != ".txt" for p, _ in items)
    messages: list[str] = []
    res = enhance_files(engine, items, out, 2, progress=False, report=messages.append)
    assert [p.name for p, _ in res.failed] == ["broken.jpg"] and "broken.jpg" in messages[0]
    expected = sorted(p.relative_to(src).as_posix() for p in src.rglob("photo*"))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == expected
    first_src, first_rel = next((p, r) for p, r in items if p.name.startswith("photo"))
    first = out / first_rel
    first.write_bytes(b"mine")
    again = enhance_files(engine, items, out, 2, progress=False)
    assert not again.written and len(again.skipped) == len(expected) and first.read_bytes() == b"mine"
    forced = enhance_files(engine, [(first_src, first_rel)], out, 2, overwrite=True, progress=False)
    assert forced.written == [first] and first.read_bytes() != b"mine"
    assert not [p for p in out.rglob(".*")]  # no temporary files left


def test_cli_enhance_unet_with_scale(tmp_path, photo_maker):
    torch.manual_seed(0)
    model = tmp_path / "run" / "generator.safetensors"
    model.parent.mkdir()
    save_generator(build_generator("unet-resnet18", pretrained=False, self_attention=False), model, data_scale=1)
    Image.fromarray(photo_maker(0, 70)).save(tmp_path / "in.jpg")
    code, _, err = run_main("enhance", tmp_path / "in.jpg", "-m", tmp_path / "run", "-o", tmp_path / "out",
                            "--scale", "2", "--quiet")
    assert code == 0, err
    with Image.open(tmp_path / "in.jpg") as a, Image.open(tmp_path / "out" / "in.jpg") as b:
        assert b.size == (a.size[0] * 2, a.size[1] * 2)
    code, out, _ = run_main("enhance", tmp_path / "in.jpg", "-m", tmp_path / "run", "-o", tmp_path / "out", "--quiet")
    assert code == 0 and "already there" in out


def test_unet_default_scale_is_that_of_its_training_data(tmp_path, photo_maker):
    torch.manual_seed(0)
    model = tmp_path / "generator.safetensors"
    save_generator(build_generator("unet-resnet18", pretrained=False, self_attention=False), model,
                   data_scale=2)
    assert load_inference(model).data_scale == 2
    Image.fromarray(photo_maker(1, 40)).save(tmp_path / "in.png")
    code, _, err = run_main("enhance", tmp_path / "in.png", "-m", model, "-o", tmp_path / "x2", "--quiet")
    assert code == 0 and "upscaling x2 before the U-Net" in err
    code, _, err = run_main("enhance", tmp_path / "in.png", "-m", model, "-o", tmp_path / "x1", "--scale", "1",
                            "--quiet")
    assert code == 0 and "upscaling" not in err
    with Image.open(tmp_path / "in.png") as a, Image.open(tmp_path / "x2" / "in.png") as b, \
            Image.open(tmp_path / "x1" / "in.png") as c:
        assert b.size == (a.size[0] * 2, a.size[1] * 2) and c.size == a.size


def test_cli_errors_are_one_line(sr_file, tmp_path, odd_files):
    cases = [
        (["enhance", odd_files.paths["rgba"], "-m", tmp_path / "nope.safetensors", "-o", tmp_path / "o"],
         "model file not found"),
        (["enhance", tmp_path / "missing.jpg", "-m", sr_file, "-o", tmp_path / "o"], "input not found"),
        (["enhance", odd_files.paths["rgba"], "-m", odd_files.paths["rgba"], "-o", tmp_path / "o"],
         "not a safetensors file"),
        (["enhance", odd_files.paths["rgba"], "-m", sr_file, "-o", tmp_path / "o", "--scale", "3"], "upsamples by 2"),
        (["enhance", odd_files.root / "text.jpg", "-m", sr_file, "-o", tmp_path / "o"], "no image could be enhanced"),
    ]
    for args, text in cases:
        code, _, err = run_main(*args, "--quiet")
        lines = [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]
        assert code != 0 and len(lines) == 1 and text in lines[0], err
        assert "Traceback" not in err


def test_cli_error_in_a_subprocess_is_one_line(cli, tmp_path):
    res = cli("enhance", tmp_path / "missing.jpg", "-m", tmp_path / "nope.safetensors", "-o", tmp_path / "o")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("crappify: error: model file")
    assert "Traceback" not in res.stderr


def test_max_pixels_skips_photos_whose_output_would_be_too_large(sr_file, tmp_path, photo_maker):
    Image.fromarray(photo_maker(0, 40)).save(tmp_path / "small.png")
    Image.fromarray(photo_maker(1, 100)).save(tmp_path / "large.png")
    with Image.open(tmp_path / "small.png") as a, Image.open(tmp_path / "large.png") as b:
        small, large = a.size[0] * a.size[1] * 4, b.size[0] * b.size[1] * 4  # output pixels at x2
    limit = (small + large) // 2
    code, out, err = run_main("enhance", tmp_path / "small.png", tmp_path / "large.png", "-m", sr_file, "-o",
                              tmp_path / "out", "--max-pixels", limit, "--quiet")
    assert code == 0 and (tmp_path / "out" / "small.png").is_file() and not (tmp_path / "out" / "large.png").exists()
    skipped = [ln for ln in err.splitlines() if "large.png" in ln]
    assert len(skipped) == 1 and f"over the limit of {limit} (--max-pixels)" in skipped[0], err
    assert "1 skipped" in out
    code, _, err = run_main("enhance", tmp_path / "large.png", "-m", sr_file, "-o", tmp_path / "o2",
                            "--max-pixels", limit, "--quiet")
    lines = [ln for ln in err.splitlines() if ln.startswith("crappify: error:")]
    assert code != 0 and len(lines) == 1 and "no image could be enhanced" in lines[0] and "Traceback" not in err
    code, _, err = run_main("enhance", tmp_path / "large.png", "-m", sr_file, "-o", tmp_path / "o3",
                            "--max-pixels", 0, "--quiet")
    assert code != 0 and "Traceback" not in err


def test_running_out_of_memory_on_one_photo_skips_it(engine, photo_dir, tmp_path, monkeypatch):
    """numpy's MemoryError outside the tiles (the output array, the alpha, encoding) skips that photo only."""
    import srgan.enhance

    real = srgan.enhance.encode_output
    calls = []

    def encode(img, *args, **kwargs):
        calls.append(img.shape)
        if len(calls) == 1:
            raise MemoryError("Unable to allocate 1.2 TiB for an array")
        return real(img, *args, **kwargs)

    monkeypatch.setattr(srgan.enhance, "encode_output", encode)
    items = collect_inputs([photo_dir], tmp_path / "out")[:2]
    messages: list[str] = []
    res = enhance_files(engine, items, tmp_path / "out", 2, progress=False, report=messages.append)
    assert len(res.written) == 1 and len(res.failed) == 1 and "out of memory" in res.failed[0][1]
    assert str(items[0][0]) in messages[0] and "out of memory" in messages[0]


def test_unet_photos_are_upscaled_tile_by_tile(tmp_path, photo_maker, monkeypatch):
    """enhance never resizes the whole photo to the output size before a U-Net: tiles resize their own input, with
    the same result (within 1 grey level) as resizing first."""
    import srgan.upsample
    from srgan.enhance import Loaded, enhance_image
    from srgan.upsample import resize_image

    torch.manual_seed(0)
    model = build_generator("unet-small", residual=True).eval()
    with torch.no_grad():
        model.layers[-1].gain.fill_(0.5)
    engine = TiledInference(model, tile=64, overlap=16)
    img = photo_maker(3, 80)
    h, w = img.shape[:2]
    want = engine(resize_image(img, (w * 2, h * 2)))
    sizes: list[int] = []
    real = srgan.upsample.resize_tensor
    monkeypatch.setattr(srgan.upsample, "resize_tensor",
                        lambda x, size: sizes.append(size[0] * size[1]) or real(x, size))
    got, _ = enhance_image(engine, Loaded(img), 2)
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert sizes and max(sizes) < h * 2 * w * 2 / 2
