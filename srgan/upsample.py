"""The one bicubic resize of the project: model inputs, residual skips and evaluation baselines all use it.

Bicubic as MATLAB's `imresize` computes it — Keys' cubic kernel with a = −0.5, pixel centres aligned
(half-pixel convention), the image mirrored at its edges (symmetric padding: …, x1, x0 | x0, x1, …), and
for shrinking an antialiasing kernel widened by the inverse scale. The super-resolution literature's
"bicubic" numbers are this function's. Written here rather than taken from OpenCV (a = −0.75, edges
replicated) or Pillow (edge weights renormalised, uint8 rounding between the two passes), because the
same arithmetic must also run *inside* a generator as its residual skip, in autograd and in ONNX export,
and must equal the evaluation baseline to the last grey level: an untrained residual generator is then
exactly the baseline.

Two appliers share `cubic_weights`: `resize_image` (any size, a gather of taps along each axis; used on
whole images outside the model) and `BicubicUpsample` (integer scale, fixed taps on shifted slices, no
size-dependent constants, so it exports with dynamic height and width). Both compute in float32 outside
autocast, so bf16 training does not round the skip.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

A = -0.5  # Keys' parameter: MATLAB imresize / Pillow; OpenCV's INTER_CUBIC uses -0.75


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = −0.5), support [-2, 2]."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (A + 2) * ax3 - (A + 3) * ax2 + 1
    far = A * ax3 - 5 * A * ax2 + 8 * A * ax - 4 * A
    return np.where(ax <= 1, near, np.where(ax < 2, far, 0.0))


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices outside [0, n) reflected symmetrically (-1 → 0, -2 → 1, n → n-1), as MATLAB's imresize."""
    period = 2 * n
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - 1 - idx, idx)


def cubic_weights(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_len, taps): output pixel i = Σ_k weights[i, k] · input[indices[i, k]].

    Upscaling uses 4 taps; shrinking widens the kernel by in/out (antialiasing) and uses more. Each row of
    weights sums to 1, so the resize commutes with any per-channel affine map (e.g. normalisation).
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"cannot resize {in_len} px to {out_len} px")
    scale = out_len / in_len
    shrink = min(scale, 1.0)
    width = 4.0 / shrink
    centre = (np.arange(out_len, dtype=np.float64) + 0.5) / scale - 0.5
    first = np.floor(centre - width / 2)
    taps = math.ceil(width) + 2
    idx = first[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    w = shrink * cubic(shrink * (centre[:, None] - idx))
    w /= w.sum(axis=1, keepdims=True)
    keep = np.any(w != 0, axis=0)  # drop all-zero tap columns, as MATLAB does
    return _mirror(idx[:, keep].astype(np.int64), in_len), w[:, keep]


def _resize_axis(x: torch.Tensor, dim: int, out_len: int) -> torch.Tensor:
    idx, w = cubic_weights(x.shape[dim], out_len)
    idx_t = torch.from_numpy(idx).to(x.device)
    w_t = torch.from_numpy(w).to(device=x.device, dtype=x.dtype)
    shape = [1] * x.ndim
    shape[dim] = out_len
    out = None
    for k in range(idx.shape[1]):
        term = x.index_select(dim, idx_t[:, k]) * w_t[:, k].view(shape)
        out = term if out is None else out.add_(term)
    return out


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a float tensor (..., H, W) to `size` = (height, width), in float32."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        if x.shape[-2] != size[0]:
            x = _resize_axis(x, x.ndim - 2, size[0])
        if x.shape[-1] != size[1]:
            x = _resize_axis(x, x.ndim - 1, size[1])
    return x


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit image (H, W) or (H, W, C) resized bicubically to `size` = (width, height), rounded to uint8.

    The LR → HR-size resize a U-Net's input gets, and the evaluation's bicubic baseline.
    """
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    w, h = size
    if img.shape[:2] == (h, w):
        return img
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    out = resize_tensor(t, (h, w)).round_().clamp_(0, 255).to(torch.uint8)
    out = out[0] if img.ndim == 2 else out.permute(1, 2, 0)
    return np.ascontiguousarray(out.numpy())


def phase_taps(scale: int) -> torch.Tensor:
    """(scale, 5) weights over input offsets -2..2 for each output phase of an integer upscale; the interior
    rows of `cubic_weights`, so `BicubicUpsample` and `resize_image` agree."""
    n = 8
    idx, w = cubic_weights(n, n * scale)
    taps = np.zeros((scale, 5))
    centre = 4  # an interior input pixel: its taps never touch the mirrored edges
    for p in range(scale):
        row = centre * scale + p
        for i, wk in zip(idx[row], w[row], strict=True):
            taps[p, i - centre + 2] += wk
    return torch.from_numpy(taps)


def _pad_symmetric(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Two pixels mirrored onto each end of `dim` (…, x1, x0 | x0, x1, … | xn-1, xn-2)."""
    n = x.shape[dim]
    if n < 2:  # one pixel: mirroring repeats it
        return torch.cat([x] * 2 + [x] + [x] * 2, dim=dim)
    first = x.narrow(dim, 0, 2).flip(dim)
    last = x.narrow(dim, n - 2, 2).flip(dim)
    return torch.cat([first, x, last], dim=dim)


class BicubicUpsample(nn.Module):
    """Bicubic upscale of an NCHW tensor by an integer `scale`, equal to `resize_tensor` (tested), built from
    slices, multiplies and adds only: no size-dependent constants, so it traces and exports for any H, W."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.taps = [[float(v) for v in row] for row in phase_taps(self.scale)]

    def _axis(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        padded = _pad_symmetric(x, dim)
        phases = []
        for row in self.taps:
            acc = None
            for k, wk in enumerate(row):
                if wk == 0.0:
                    continue
                term = padded.narrow(dim, k, n) * wk
                acc = term if acc is None else acc + term
            phases.append(acc)
        out = torch.stack(phases, dim=dim + 1)  # (..., n, scale, ...) → interleaved along dim
        shape = list(x.shape)
        shape[dim] = n * self.scale
        return out.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return x.float()
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            return self._axis(self._axis(x, 2), 3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
