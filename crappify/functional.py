"""Pure image functions behind the degradation ops.

Every function takes an HWC uint8 RGB array (plus plain parameters) and returns a new one; none of
them reads files or touches global random state (noise takes an explicit seed). Where OpenCV,
Pillow or albumentations already has the operation we call it; what is written here by hand says why.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from PIL import Image

INTERPOLATIONS = ("nearest", "area", "bilinear", "bicubic", "lanczos")
_CV2_INTER = {
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
_PIL_FILTER = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
FILLS = ("black", "noise", "mean")


def _albumentations_pixel():  # imported on first use: albumentations takes ~2 s to import
    import albumentations.augmentations.pixel.functional as ab_pixel

    return ab_pixel


def resize(img: np.ndarray, width: int, height: int, interpolation: str = "bicubic",
           antialias: bool = True) -> np.ndarray:
    """Resize to exactly `width`×`height` (always a new array).

    Shrinking by more than 2× with bilinear/bicubic/lanczos and `antialias=True` uses Pillow's
    convolution resamplers, whose kernel widens with the scale (what Pillow, torchvision's
    `antialias=True` and the fastai lesson-7 crappifier use). OpenCV's kernels do not widen: past 2×
    they skip input pixels and alias, which is what `antialias=False` gives (like Real-ESRGAN's
    `F.interpolate`); up to 2× they still touch every input pixel, so OpenCV is used there either way
    (it is 5-10× faster than Pillow). `area` is OpenCV's pixel-area average and `nearest` is
    nearest-neighbour, both from OpenCV.
    """
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img.copy()
    if interpolation not in _CV2_INTER:
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    shrinking = width * 2 < w or height * 2 < h
    if antialias and shrinking and interpolation in _PIL_FILTER:
        out = Image.fromarray(img).resize((width, height), _PIL_FILTER[interpolation])
        return np.asarray(out)
    return cv2.resize(img, (width, height), interpolation=_CV2_INTER[interpolation])


def gaussian_kernel(sigma_x: float, sigma_y: float, angle: float, size: int) -> np.ndarray:
    """A normalised 2-D Gaussian kernel, rotated by `angle` degrees.

    Written here because OpenCV only has axis-aligned Gaussians and albumentations' anisotropic
    kernels are tied to its own random sampling; the rotated covariance is a few lines.
    """
    half = size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xs + s * ys
    v = -s * xs + c * ys
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).astype(np.float32)


def _kernel_distance(sigma_x: float, sigma_y: float, angle: float, size: int) -> np.ndarray:
    """Mahalanobis distance of each tap from the centre for a rotated (σx, σy) ellipse (angle in degrees)."""
    half = size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    u = (c * xs + s * ys) / sigma_x
    v = (-s * xs + c * ys) / sigma_y
    return np.sqrt(u * u + v * v)


def generalized_gaussian_kernel(sigma_x: float, sigma_y: float, angle: float, beta: float,
                                size: int) -> np.ndarray:
    """Normalised exp(-½·d^β) kernel (d: the rotated ellipse's distance); β=2 is the Gaussian.

    Real-ESRGAN's shape: β<2 has heavier tails, β>2 a flatter top. BasicSR raises d² to its `betag`,
    so its betag is our β/2. Hand-written: neither OpenCV nor albumentations has this kernel.
    """
    k = np.exp(-0.5 * _kernel_distance(sigma_x, sigma_y, angle, size) ** beta)
    return (k / k.sum()).astype(np.float32)


def plateau_kernel(sigma_x: float, sigma_y: float, angle: float, beta: float, size: int) -> np.ndarray:
    """Normalised plateau-shaped kernel 1/(1+d^β) (Real-ESRGAN's; BasicSR's betap is our β/2).

    Hand-written: neither OpenCV nor albumentations has it.
    """
    k = 1.0 / (1.0 + _kernel_distance(sigma_x, sigma_y, angle, size) ** beta)
    return (k / k.sum()).astype(np.float32)


def bessel_j1(x: np.ndarray) -> np.ndarray:
    """Bessel function J1 by Bessel's integral, J1(x) = mean over τ∈[0, 2π) of cos(τ - x·sin τ).

    The trapezoid rule on a periodic integrand converges geometrically once the point count exceeds
    |x|; 256 points give ~1e-15 for the |x| ≤ 50 a 21-tap sinc kernel needs. Written here so the
    package needs no SciPy.
    """
    tau = np.linspace(0.0, 2 * np.pi, 256, endpoint=False)
    x = np.asarray(x, np.float64)
    return np.cos(tau - x[..., None] * np.sin(tau)).mean(axis=-1)


def sinc_kernel(omega_c: float, size: int) -> np.ndarray:
    """Normalised circularly symmetric low-pass (2-D "sinc", an Airy/jinc pattern) with cutoff `omega_c`.

    The ideal disc-shaped frequency response of radius `omega_c` (radians, π = Nyquist) has impulse
    response ω·J1(ω·r)/(2π·r), ω²/(4π) at r = 0; cut to `size`×`size` taps and normalised to DC gain 1,
    as BasicSR's `circular_lowpass_kernel`. It adds ringing and overshoot. Hand-written (OpenCV lacks it).
    """
    half = size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    r = np.hypot(xs, ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * bessel_j1(omega_c * r) / (2 * np.pi * r)
    k[half, half] = omega_c ** 2 / (4 * np.pi)
    return (k / k.sum()).astype(np.float32)


BLUR_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def blur_kernel(kernel: str, size: int, sigma_x: float = 1.0, sigma_y: float | None = None,
                angle: float = 0.0, beta: float = 2.0, omega_c: float | None = None) -> np.ndarray:
    """The `size`×`size` kernel Real-ESRGAN's names describe (BLUR_KERNELS, or `sinc` with `omega_c`).

    `*_iso` kernels ignore `sigma_y` and `angle`; plain `iso`/`aniso` are Gaussians.
    """
    if kernel == "sinc":
        if omega_c is None:
            raise ValueError("the sinc kernel needs omega_c")
        return sinc_kernel(omega_c, size)
    if kernel not in BLUR_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(BLUR_KERNELS)}, sinc")
    if kernel.endswith("_iso") or kernel == "iso":
        sigma_y, angle = sigma_x, 0.0
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if kernel.startswith("generalized"):
        return generalized_gaussian_kernel(sigma_x, sigma_y, angle, beta, size)
    if kernel.startswith("plateau"):
        return plateau_kernel(sigma_x, sigma_y, angle, beta, size)
    return gaussian_kernel(sigma_x, sigma_y, angle, size)


def filter_kernel(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve with a (symmetric) kernel: OpenCV's `filter2D`, mirrored borders (torch's 'reflect')."""
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def kernel_size_for(sigma: float, max_size: int = 21) -> int:
    """Odd kernel size covering ±3σ, capped at `max_size`."""
    size = 2 * math.ceil(3 * sigma) + 1
    cap = max_size if max_size % 2 else max_size - 1
    return int(min(max(size, 3), cap))


def gaussian_blur(img: np.ndarray, sigma_x: float, sigma_y: float | None = None, angle: float = 0.0,
                  kernel_size: int | None = None) -> np.ndarray:
    """Gaussian blur: isotropic (OpenCV's separable `GaussianBlur`) or anisotropic and rotated."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    size = kernel_size or kernel_size_for(max(sigma_x, sigma_y))
    if sigma_x == sigma_y:
        return cv2.GaussianBlur(img, (size, size), sigmaX=sigma_x, sigmaY=sigma_x,
                                borderType=cv2.BORDER_REFLECT_101)
    kernel = gaussian_kernel(sigma_x, sigma_y, angle, size)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def usm_sharpen(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """Unsharp masking as Real-ESRGAN sharpens its ground truth (BasicSR's `usm_sharp`).

    residual = img - GaussianBlur(img); only where |residual| (0-255 scale) exceeds `threshold`,
    softened by the same blur, is `img + weight * residual` blended in, so flat areas and fine noise
    stay untouched. The kernel is `radius` px made odd (BasicSR's convention), sigma from OpenCV's
    size rule. Hand-written: OpenCV has the blur but no thresholded, soft-masked USM.
    """
    size = int(radius) | 1
    x = img.astype(np.float32)
    blur = cv2.GaussianBlur(x, (size, size), 0, borderType=cv2.BORDER_REFLECT_101)
    residual = x - blur
    mask = (np.abs(residual) > threshold).astype(np.float32)
    soft = cv2.GaussianBlur(mask, (size, size), 0, borderType=cv2.BORDER_REFLECT_101)
    if soft.ndim == 2:
        soft = soft[..., None]
    sharp = np.clip(x + weight * residual, 0, 255)
    out = soft * sharp + (1 - soft) * x
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def motion_blur(img: np.ndarray, length: int, angle: float) -> np.ndarray:
    """Linear motion blur along `angle` degrees over `length` pixels (odd); kernel from albumentations."""
    length = max(3, int(length) | 1)
    import albumentations.augmentations.blur.functional as ab_blur  # ~2 s import, only when used

    kernel = ab_blur.create_motion_kernel(length, angle, 0.0, False, None).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _add_noise(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    out = img.astype(np.float32)
    out += noise if noise.ndim == 3 else noise[..., None]
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)


def gaussian_noise(img: np.ndarray, sigma: float, gray: bool, seed: int) -> np.ndarray:
    """Additive Gaussian noise of std `sigma` (0–255 scale); `gray` uses one noise plane for all channels.

    Hand-written so the noise is drawn from an explicit seed, which the manifest records.
    """
    rng = np.random.default_rng(seed)
    shape = img.shape[:2] if gray else img.shape
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= sigma
    return _add_noise(img, noise)


def poisson_noise(img: np.ndarray, scale: float, gray: bool, seed: int) -> np.ndarray:
    """Signal-dependent (shot) noise as in Real-ESRGAN: Poisson counts at 8-bit levels, times `scale`.

    Hand-written because albumentations' `shot_noise` works in linear light with a different
    parameterisation; this one matches the degradation model our users compare against.
    """
    rng = np.random.default_rng(seed)
    x = img.astype(np.float32) / 255.0
    if gray:
        x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
    levels = 255.0
    noisy = rng.poisson(np.clip(x, 0, 1) * levels).astype(np.float32) / levels
    noise = (noisy - x) * (scale * 255.0)
    return _add_noise(img, noise)


def jpeg_encode(img: np.ndarray, quality: int) -> bytes:
    """Encode as baseline JPEG (4:2:0) at `quality` with OpenCV; returns the file's bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode JPEG")
    return buf.tobytes()


def jpeg_decode(data: bytes) -> np.ndarray:
    """Decode JPEG bytes (as written by `jpeg_encode`) to RGB."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG compression artefacts: encode at `quality` and decode back.

    Hand-written over OpenCV rather than albumentations' `ImageCompression` because the builder
    stores the very bytes that were encoded when JPEG is the last op, and albumentations drops them.
    """
    return jpeg_decode(jpeg_encode(img, quality))


def occlude(img: np.ndarray, rects: list[list[int]], fill: str, seed: int) -> np.ndarray:
    """Paint rectangles `[x, y, w, h]` with black, uniform noise or the image's mean colour.

    Hand-written: albumentations' CoarseDropout samples its own holes; here they are given.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")
    out = img.copy()
    rng = np.random.default_rng(seed)
    mean = img.reshape(-1, img.shape[2]).mean(axis=0).round().astype(np.uint8)
    for x, y, w, h in rects:
        region = out[y:y + h, x:x + w]
        if fill == "black":
            region[...] = 0
        elif fill == "mean":
            region[...] = mean
        else:
            region[...] = rng.integers(0, 256, region.shape, dtype=np.uint8)
    return out


def text(img: np.ndarray, message: str, x: int, y: int, font_scale: float, color: tuple[int, int, int],
         thickness: int = 1) -> np.ndarray:
    """Draw `message` with its baseline-left corner at (x, y) using OpenCV's Hershey font."""
    out = img.copy()
    cv2.putText(out, message, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                tuple(int(c) for c in color), thickness, cv2.LINE_AA)
    return out


@functools.lru_cache(maxsize=4096)  # lesson 7 measures the same few numbers for every image
def text_size(message: str, font_scale: float, thickness: int = 1) -> tuple[int, int]:
    """Width and height (above the baseline) of `message` as `text` would draw it."""
    (w, h), _ = cv2.getTextSize(message, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    return w, h


def color_jitter(img: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue: float) -> np.ndarray:
    """torchvision-style colour jitter (factors; hue a shift in turns), via albumentations' functions."""
    ab_pixel = _albumentations_pixel()
    out = img
    if brightness != 1:
        out = ab_pixel.adjust_brightness_torchvision(out, brightness)
    if contrast != 1:
        out = ab_pixel.adjust_contrast_torchvision(out, contrast)
    if saturation != 1:
        out = ab_pixel.adjust_saturation_torchvision(out, saturation)
    if hue != 0:
        out = ab_pixel.adjust_hue_torchvision(out, hue)
    return out if out is not img else img.copy()


def desaturate(img: np.ndarray, amount: float) -> np.ndarray:
    """Blend toward greyscale: 0 keeps colour, 1 is fully grey (albumentations' saturation blend)."""
    out = _albumentations_pixel().adjust_saturation_torchvision(img, 1.0 - min(max(amount, 0.0), 1.0))
    return out.copy() if out is img else out
