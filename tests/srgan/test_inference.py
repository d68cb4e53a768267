"""Tiled inference: tiles blend into the untiled result, any size, scale, OOM retry, precision fallback."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from srgan.checkpoint import save_generator
from srgan.generators import build_generator
from srgan.inference import TiledInference, axis_weights, load_inference, resolve_inference_precision, tile_origins
from srgan.predict import predict
from srgan.runtime import is_channels_last
from srgan.upsample import resize_image


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_generator("unet-resnet18", pretrained=False).eval()


@pytest.fixture(scope="module")
def srnet():
    torch.manual_seed(0)
    return build_generator("srresnet", scale=4, pretrained=False, n_blocks=1, n_feats=8).eval()


def test_tile_grid_covers_and_weights_sum_to_one():
    origins = tile_origins(300, 128, 96)
    assert origins[0] == 0 and origins[-1] == 300 - 128 and all(b > a for a, b in itertools.pairwise(origins))
    total = torch.zeros(300)
    for o, w in zip(origins, axis_weights(origins, 128, 300, 32), strict=False):
        assert (w > 0).all()
        total[o:o + 128] += w
    assert torch.allclose(total, torch.ones(300), atol=1e-6)
    assert tile_origins(50, 128, 96) == [0]


def test_srresnet_tiled_equals_untiled(srnet, photo_maker):
    img = photo_maker(1, 150)
    full = TiledInference(srnet, tile=0)(img)
    tiled = TiledInference(srnet, tile=64, overlap=32)(img)
    assert full.shape == tiled.shape == (img.shape[0] * 4, img.shape[1] * 4, 3)
    diff = np.abs(full.astype(int) - tiled.astype(int))
    assert diff.max() <= 8 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_unet_tiled_matches_untiled(unet, photo_maker):
    # A random-weight ResNet U-Net sees far (its receptive field is hundreds of px), so tiles much smaller
    # than the image cannot match exactly; with tiles over half the image the blend stays close.
    img = photo_maker(2, 300)
    full = TiledInference(unet, tile=0)(img)
    tiled = TiledInference(unet, tile=256, overlap=128, batch=2)(img)
    assert full.shape == tiled.shape == img.shape
    diff = np.abs(full.astype(int) - tiled.astype(int))
    assert diff.mean() < 2.5 and np.percentile(diff, 99) < 16


def test_an_image_within_one_tile_is_the_untiled_pass(unet, photo_maker):
    """E.g. a 1024² photo at the CUDA default tile: one forward pass, bit-identical to untiled."""
    img = photo_maker(5, 128)[:96, :128]
    calls: list[tuple[int, int]] = []
    tiled = TiledInference(unet, tile=128)(img, lambda done, total: calls.append((done, total)))
    assert calls == [(1, 1)]
    assert np.array_equal(tiled, TiledInference(unet, tile=0)(img))


@pytest.mark.parametrize("batch", [2, 3, 7, 64])
def test_batches_spanning_rows_blend_like_one_tile_at_a_time(srnet, photo_maker, batch):
    """A 4x4 grid: batches of 2, 3, 7 or all tiles cut across rows; every tile lands where it belongs."""
    img = photo_maker(4, 120)
    one = TiledInference(srnet, tile=48, overlap=16, batch=1)
    seen: list[tuple[int, int]] = []
    many = TiledInference(srnet, tile=48, overlap=16, batch=batch)(img, lambda done, total: seen.append((done, total)))
    ref = one(img)
    assert many.shape == ref.shape
    diff = np.abs(many.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()  # batched convolutions may round differently, nothing more
    assert seen[-1][0] == seen[-1][1] == 16 and len(seen) == -(-16 // batch)


@pytest.mark.parametrize("shape", [(37, 53), (1, 65), (64, 1), (33, 97)])
def test_odd_sizes_come_back_at_input_size_times_scale(unet, srnet, shape):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert TiledInference(unet, tile=64, overlap=32)(img).shape == (*shape, 3)
    assert TiledInference(srnet, tile=16, overlap=8)(img).shape == (shape[0] * 4, shape[1] * 4, 3)


def test_untiled_equals_predict_with_padding(unet, photo_maker):
    img = photo_maker(3, 100)
    assert np.array_equal(TiledInference(unet, tile=0)(img), predict(unet, img))


def test_oom_retries_with_smaller_batches_then_tiles(srnet, photo_maker, monkeypatch):
    engine = TiledInference(srnet, tile=64, overlap=16, batch=4, on_note=lambda _t: None)
    real = engine._model
    calls = []

    def flaky(x, precision):
        calls.append(tuple(x.shape))
        if x.shape[0] > 1 or x.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(x, precision)

    monkeypatch.setattr(engine, "_model", flaky)
    img = photo_maker(1, 100)
    out = engine(img)
    assert out.shape == (img.shape[0] * 4, img.shape[1] * 4, 3)
    assert engine.batch == 1 and engine.tile == 32
    assert any("out of memory" in n for n in engine.notes)


def test_nan_in_reduced_precision_falls_back_to_fp32(srnet, photo_maker, monkeypatch):
    engine = TiledInference(srnet, tile=0, precision="bf16", on_note=lambda _t: None)
    assert engine.precision == "bf16"
    real = engine._model

    def poisoned(x, precision):
        y = real(x, "fp32")
        return y * float("nan") if precision != "fp32" else y

    monkeypatch.setattr(engine, "_model", poisoned)
    img = photo_maker(1, 40)
    out = engine(img)
    assert engine.precision == "fp32" and any("NaN" in n for n in engine.notes)
    assert np.array_equal(out, TiledInference(srnet, tile=0)(img))


def test_precision_fallbacks():
    cpu = torch.device("cpu")
    assert resolve_inference_precision("fp16", cpu) == ("fp32", "fp16 is not supported on cpu; using fp32")
    assert resolve_inference_precision("fp32", cpu) == ("fp32", None)
    assert resolve_inference_precision("auto", cpu)[0] in ("fp32", "bf16")


def test_load_inference_from_file(srnet, tmp_path):
    path = tmp_path / "g.safetensors"
    save_generator(srnet, path, data_scale=4)
    engine = load_inference(path, tile=16)
    assert engine.model_scale == 4 and engine.multiple == 1
    img = np.zeros((10, 12, 3), np.uint8)
    assert engine(img).shape == (40, 48, 3)


def test_numpy_memory_error_is_out_of_memory_too(srnet, photo_maker, monkeypatch):
    """A CPU allocation that fails in numpy (MemoryError) shrinks the tiles as torch's OOM does."""
    engine = TiledInference(srnet, tile=64, overlap=16, on_note=lambda _t: None)
    real = engine._model

    def flaky(x, precision):
        if x.shape[-1] > 32:
            raise MemoryError("Unable to allocate 3.1 GiB for an array")
        return real(x, precision)

    monkeypatch.setattr(engine, "_model", flaky)
    img = photo_maker(1, 80)
    assert engine(img).shape == (img.shape[0] * 4, img.shape[1] * 4, 3)
    assert engine.tile == 32 and any("out of memory" in n for n in engine.notes)


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    model = build_generator("unet-small", residual=True).eval()
    with torch.no_grad():  # a correction that is not zero, so the output is not just the bicubic input
        model.layers[-1].gain.fill_(0.5)
    return model


@pytest.mark.parametrize("factor", [2, 3])
def test_unet_upscales_tile_by_tile_like_resizing_the_whole_photo_first(small_unet, photo_maker, monkeypatch, factor):
    """`upscale`: each tile resizes its own photo pixels; the result is that of resizing the whole photo first
    (within 1 grey level), and nothing the size of the whole upscaled photo is ever resized."""
    import srgan.upsample
    from srgan.inference import Upscaled

    img = photo_maker(2, 80)
    h, w = img.shape[:2]
    want = TiledInference(small_unet, tile=64, overlap=16)(resize_image(img, (w * factor, h * factor)))
    sizes: list[int] = []
    real = srgan.upsample.resize_tensor

    def recording(x, size):
        sizes.append(size[0] * size[1])
        return real(x, size)

    monkeypatch.setattr(srgan.upsample, "resize_tensor", recording)
    got = TiledInference(small_unet, tile=64, overlap=16)(img, input_scale=factor)
    assert got.shape == want.shape == (h * factor, w * factor, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert sizes and max(sizes) < h * factor * w * factor / 2  # tile-sized pieces only
    up = Upscaled(img, factor)  # any region, at the edges or inside, is that region of the whole resize
    whole = real(torch.from_numpy(img).permute(2, 0, 1), (h * factor, w * factor)).round().clamp(0, 255)
    whole = whole.to(torch.uint8).permute(1, 2, 0).numpy()
    for y0, y1, x0, x1 in [(0, 7, 0, 9), (5, 40, 11, 60), (h * factor - 13, h * factor, 3, w * factor)]:
        assert np.abs(up.region(y0, y1, x0, x1).astype(int) - whole[y0:y1, x0:x1].astype(int)).max() <= 1


def test_bands_of_tile_columns_give_the_same_bytes(srnet, small_unet, photo_maker, monkeypatch):
    """A photo wider than BAND_TILES tiles is done in vertical bands (a strip never wider than a band): the tiles on
    a band's edge run once per band and every pixel sums the same tiles in the same order, so the bytes are those
    of one band over the whole width."""
    import srgan.inference

    img = photo_maker(2, 100)
    cases = [(srnet, {"tile": 24, "overlap": 8}, 1), (srnet, {"tile": 16, "overlap": 12, "batch": 3}, 1),
             (small_unet, {"tile": 64, "overlap": 16}, 2)]
    whole = [TiledInference(model, **kw)(img, input_scale=up) for model, kw, up in cases]
    for per_band in (1, 2):
        monkeypatch.setattr(srgan.inference, "BAND_TILES", per_band)
        for (model, kw, up), want in zip(cases, whole, strict=True):
            assert np.array_equal(TiledInference(model, **kw)(img, input_scale=up), want), (per_band, kw, up)


def test_bands_and_weights_stay_the_size_of_a_few_tiles():
    """However long the axis, a band needs only its own tiles and those reaching into it, and one tile's blending
    weights are computed from its neighbours alone (the same numbers as over the whole axis)."""
    from srgan.inference import axis_weight, bands

    origins = tile_origins(1_000_000, 512, 448)
    parts = bands(origins, 512, 16)
    assert parts[0] == (0, 0, 16) and parts[-1][2] == len(origins)
    assert all(b - lo <= 17 and lo == a - 1 for lo, a, b in parts[1:])
    short = tile_origins(3000, 512, 448)
    for i, w in enumerate(axis_weights(short, 512, 3000, 64)):
        assert torch.equal(axis_weight(short, i, 512, 64), w)
    assert axis_weight(origins, len(origins) // 2, 512, 64).shape == (512,)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_padding_indices_are_numpys_reflection_for_any_range(n):
    from srgan.inference import _pad_index

    whole = np.pad(np.arange(n), (0, 40), mode="reflect" if n > 1 else "edge")
    for start, stop in [(0, n + 40), (0, 1), (n - 1, n + 5), (5, 33), (n + 10, n + 40)]:
        assert np.array_equal(_pad_index(n, start, stop), whole[start:stop]), (start, stop)


@pytest.mark.parametrize("arch", ["unet", "srnet"])
def test_tiles_run_channels_last_by_default_with_the_plain_layouts_output(arch, request):
    """Every convolution sees channels-last tiles (oneDNN's faster kernels: a ResNet-34 U-Net or RRDB x4 a quarter
    faster on a 2-core CPU, benchmarks/README.md); the output is the plain layout's, to rounding."""
    model = request.getfixturevalue(arch)
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(is_channels_last(args[0])))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    img = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    try:
        engine = TiledInference(model, tile=32, overlap=8)
        fast = engine(img)
    finally:
        for h in hooks:
            h.remove()
    assert engine.channels_last and seen and all(seen)
    plain = TiledInference(model.to(memory_format=torch.contiguous_format), tile=32, overlap=8, channels_last=False)
    assert np.abs(fast.astype(int) - plain(img).astype(int)).max() <= 1
