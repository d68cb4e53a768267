"""The one bicubic resize: MATLAB imresize's kernel, one definition behind both appliers, ONNX-friendly form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srgan.upsample import BicubicUpsample, cubic_weights, phase_taps, resize_image, resize_tensor


def test_keys_taps_for_x2():
    # Keys a = -0.5 at distances 1.75, 0.75, 0.25, 1.25 (MATLAB imresize's x2 weights)
    expected = [-0.0234375, 0.2265625, 0.8671875, -0.0703125]
    taps = phase_taps(2)
    assert torch.allclose(taps[0, :4], torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(taps[1], taps[0].flip(0))


@pytest.mark.parametrize("n_in, n_out", [(5, 10), (7, 21), (3, 12), (10, 4), (9, 9), (1, 3), (2, 8)])
def test_weights_sum_to_one_and_indices_stay_inside(n_in, n_out):
    idx, w = cubic_weights(n_in, n_out)
    assert idx.shape == w.shape and idx.shape[0] == n_out
    assert np.allclose(w.sum(axis=1), 1.0)
    assert idx.min() >= 0 and idx.max() < n_in


def test_edges_mirror_symmetrically():
    # the first output pixel of a x2 upscale reads input -2 and -1, mirrored to 1 and 0 (MATLAB's symmetric pad)
    idx, _ = cubic_weights(6, 12)
    assert list(idx[0]) == [1, 0, 0, 1]


def test_linear_ramps_and_constants_are_reproduced():
    ramp = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (6, 1))
    out = resize_image(ramp, (40, 12))
    inner = out[:, 4:-4].astype(int)
    assert np.abs(np.diff(inner, axis=1) - 5).max() <= 1  # cubic convolution reproduces linear functions
    flat = np.full((5, 7, 3), 123, np.uint8)
    assert (resize_image(flat, (21, 15)) == 123).all()


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
def test_module_equals_the_image_resize(scale):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 14) * 255
    a = BicubicUpsample(scale)(x)
    b = resize_tensor(x, (9 * scale, 14 * scale))
    assert a.shape == (2, 3, 9 * scale, 14 * scale)
    assert torch.allclose(a, b, atol=1e-3)


def test_module_ignores_autocast_and_keeps_gradients():
    x = torch.rand(1, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = BicubicUpsample(2)(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_resize_image_keeps_shape_conventions():
    rgb = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    assert resize_image(rgb, (14, 20)).shape == (20, 14, 3)
    assert resize_image(rgb[..., 0], (14, 20)).shape == (20, 14)
    assert resize_image(rgb, (7, 10)) is rgb  # same size: untouched
    with pytest.raises(ValueError, match="uint8"):
        resize_image(rgb.astype(np.float32), (14, 20))
