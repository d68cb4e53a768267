"""SSIM in the two conventions results are compared in: torchmetrics' (the image reflect-padded, the whole map
averaged; `evaluate`'s on a built dataset) and BasicSR's `calculate_ssim` (the map only where the window fits;
benchmark folders). Both: float64, 11×11 Gaussian window (σ 1.5), K1 0.01, K2 0.03, channels averaged.

Written here rather than called from torchmetrics because of time: its SSIM filters five float64 maps with the
11×11 window as one 2-D `conv2d`, which torch runs without a fast float64 kernel: 37 s for one RGB SSIM of a
2040×1356 DIV2K-sized image on one core, so seconds to minutes per pair in `evaluate`. The window is the outer
product of a 1-D Gaussian, so OpenCV's separable filter (float64, rows then columns, reflect-101 edges as
torchmetrics' reflect padding) gives the same map to float64 rounding: the whole RGB SSIM in 0.3 s.
tests/srgan/test_metrics.py checks both conventions against torchmetrics and a direct 2-D filtering.
"""

from __future__ import annotations

import cv2
import numpy as np

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def gaussian_1d(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product with itself is SSIM's 2-D window (float64)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


_G = gaussian_1d()


def _channels(a: np.ndarray, b: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two H×W or H×W×C images as float64 H×W planes, channel by channel."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 2:
        return [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))]
    return [(np.ascontiguousarray(a[..., c], dtype=np.float64), np.ascontiguousarray(b[..., c], dtype=np.float64))
            for c in range(a.shape[2])]  # each plane converted once, from the input itself


def _filter(plane: np.ndarray) -> np.ndarray:
    """The plane filtered by the window (same size; the edges reflected without repeating the border pixel)."""
    return cv2.sepFilter2D(plane, cv2.CV_64F, _G, _G, borderType=cv2.BORDER_REFLECT_101)


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, clamp: bool) -> np.ndarray:
    """SSIM's map of two planes, same size; `clamp` keeps the variances ≥ 0 (torchmetrics does, BasicSR not)."""
    mu_x, mu_y = _filter(x), _filter(y)
    var_x, var_y, cov = _filter(x * x) - mu_x**2, _filter(y * y) - mu_y**2, _filter(x * y) - mu_x * mu_y
    if clamp:
        var_x, var_y = np.maximum(var_x, 0.0), np.maximum(var_y, 0.0)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim_reflect(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """torchmetrics' `structural_similarity_index_measure` with its defaults: each image reflect-padded by half
    the window, so the map covers every pixel, edges included, and its mean is the result. Like torchmetrics
    (whose padding needs it), an image must be over 5 px a side."""
    planes = _channels(a, b)
    if min(planes[0][0].shape) <= WINDOW // 2:
        raise ValueError(f"SSIM needs an image over {WINDOW // 2} px a side, got {tuple(a.shape)}")
    return float(np.mean([_ssim_map(x, y, data_range, clamp=True).mean() for x, y in planes]))


def ssim_valid(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM as BasicSR's `calculate_ssim` computes it: the map only where the window fits inside the image
    ('valid'), its mean per channel, channels averaged; NaN for an image under 11 px a side (an empty map)."""
    planes = _channels(a, b)
    if min(planes[0][0].shape) < WINDOW:
        return float("nan")
    r = WINDOW // 2  # the filtered map's margin that depends on the edges: left out
    return float(np.mean([_ssim_map(x, y, data_range, clamp=False)[r:-r, r:-r].mean() for x, y in planes]))
