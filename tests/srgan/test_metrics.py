"""SSIM by a separable Gaussian filter (`srgan.metrics`) gives torchmetrics' SSIM and a direct 2-D filtering of
BasicSR's to float64 rounding, on real photos of several shapes, in RGB and in Y; the edge cases stay theirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from srgan.metrics import gaussian_1d, ssim_reflect, ssim_valid
from srgan.upsample import resize_image


def torchmetrics_ssim(a: np.ndarray, b: np.ndarray) -> float:
    def tensor(img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(img.astype(np.float64))
        return t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]

    return float(structural_similarity_index_measure(tensor(a), tensor(b), data_range=255.0))


def direct_valid_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """BasicSR's definition with the 11×11 window applied as one 2-D filter, channel by channel."""
    g = torch.from_numpy(gaussian_1d())
    window = torch.outer(g, g)[None, None]
    values = []
    for c in range(1 if a.ndim == 2 else a.shape[2]):
        x, y = (torch.from_numpy((t if t.ndim == 2 else t[..., c]).astype(np.float64))[None, None] for t in (a, b))
        mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
        var_x = F.conv2d(x * x, window) - mu_x**2
        var_y = F.conv2d(y * y, window) - mu_y**2
        cov = F.conv2d(x * y, window) - mu_x * mu_y
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        m = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        values.append(float(m.mean()))
    return float(np.mean(values))


def degraded(hr: np.ndarray) -> np.ndarray:
    h, w = hr.shape[:2]
    return resize_image(resize_image(hr, (max(1, w // 3), max(1, h // 3))), (w, h))  # an SR-like error


@pytest.mark.parametrize("long_side,portrait", [(140, False), (97, True), (23, False)])
def test_both_conventions_match_their_references_in_rgb_and_y(photo_maker, long_side, portrait):
    hr = photo_maker(1, long_side, portrait)
    pred = degraded(hr)
    y_hr, y_pred = hr.astype(np.float64).mean(axis=2), pred.astype(np.float64).mean(axis=2)
    for a, b in ((pred, hr), (y_pred, y_hr)):
        assert ssim_reflect(a, b) == pytest.approx(torchmetrics_ssim(a, b), abs=1e-12)
        assert ssim_valid(a, b) == pytest.approx(direct_valid_ssim(a, b), abs=1e-12)
        assert 0.0 < ssim_valid(a, b) < 1.0 and 0.0 < ssim_reflect(a, b) < 1.0
        assert ssim_reflect(b, b) == pytest.approx(1.0, abs=1e-12) and ssim_valid(b, b) == pytest.approx(1.0)


def test_a_flat_and_a_negative_correlation_are_scored_as_torchmetrics_does():
    flat = np.full((32, 40), 128, np.uint8)
    ramp = np.tile(np.arange(40, dtype=np.uint8) * 6, (32, 1))
    for a, b in ((flat, ramp), (ramp, 255 - ramp)):
        assert ssim_reflect(a, b) == pytest.approx(torchmetrics_ssim(a, b), abs=1e-12)


def test_edge_cases():
    small = np.zeros((10, 30), np.uint8)
    assert np.isnan(ssim_valid(small, small))  # BasicSR's mean of an empty map
    with pytest.raises(ValueError, match="differ in size"):
        ssim_reflect(np.zeros((20, 20), np.uint8), np.zeros((20, 21), np.uint8))
    with pytest.raises(ValueError, match="differ in size"):
        ssim_valid(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match="over 5 px"):  # torchmetrics' reflect padding fails there too
        ssim_reflect(np.zeros((5, 30), np.uint8), np.zeros((5, 30), np.uint8))
    assert ssim_reflect(np.zeros((6, 30), np.uint8), np.full((6, 30), 9, np.uint8)) == pytest.approx(
        torchmetrics_ssim(np.zeros((6, 30), np.uint8), np.full((6, 30), 9, np.uint8)), abs=1e-12)
