"""PSNR and SSIM as the super-resolution papers report them (the BasicSR convention).

Conventions, all in float64 NumPy (no OpenCV, no SciPy):

* inputs are pixel values on the 0-255 scale, float, never rounded (a 16-bit image is
  ``x / 65535 * 255``);
* ``crop_border`` pixels are removed from every side before anything else (0 keeps all);
* with ``test_y_channel=True`` an RGB image is reduced to the Y of BT.601 YCbCr,
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (the MATLAB ``rgb2ycbcr`` luma), not
  rounded; a single-channel image is used as it is;
* PSNR uses the peak 255 and the MSE over every remaining value (all channels for RGB);
  identical images give ``inf``;
* SSIM uses an 11x11 Gaussian window with sigma 1.5 (the normalised 1-D kernel, outer product),
  ``C1 = (0.01 * 255)**2``, ``C2 = (0.03 * 255)**2``, local statistics on the *valid* region
  only (no padding: the map is 10 pixels smaller in each dimension than the image) and the mean
  of the SSIM map; for several channels, the mean of the per-channel SSIMs.

Arrays may be ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` (RGB order).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from diffsr.errors import ConfigError

__all__ = ["SSIM_SIGMA", "SSIM_WINDOW", "Y_WEIGHTS", "gaussian_kernel", "psnr", "rgb_to_y", "ssim"]

Y_WEIGHTS: tuple[float, float, float] = (65.481, 128.553, 24.966)
"""BT.601 luma weights for R, G, B (values 0-255, result divided by 255, offset 16)."""

SSIM_WINDOW: int = 11
SSIM_SIGMA: float = 1.5
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y of BT.601 YCbCr for an ``(..., 3)`` RGB array on the 0-255 scale; float64, not rounded."""
    a = np.asarray(img, dtype=np.float64)
    if a.shape[-1] != 3:
        raise ConfigError(f"rgb_to_y needs an (..., 3) RGB array, got shape {a.shape}")
    wr, wg, wb = Y_WEIGHTS
    return 16.0 + (wr * a[..., 0] + wg * a[..., 1] + wb * a[..., 2]) / 255.0


def gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian, ``exp(-(i - (size-1)/2)**2 / (2 sigma**2))`` summing to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def _prepare(
    pred: np.ndarray, gt: np.ndarray, crop_border: int, test_y_channel: bool, what: str
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(gt, dtype=np.float64)
    for name, x in (("pred", a), ("gt", b)):
        if x.ndim == 2:
            continue
        if x.ndim != 3 or x.shape[2] not in (1, 3):
            raise ConfigError(f"{what}: {name} must have shape (H, W), (H, W, 1) or (H, W, 3), got {x.shape}")
    if a.ndim == 2:
        a = a[..., None]
    if b.ndim == 2:
        b = b[..., None]
    if a.shape != b.shape:
        raise ConfigError(f"{what}: pred and gt shapes differ: {a.shape} vs {b.shape}")
    if isinstance(crop_border, bool) or int(crop_border) != crop_border or crop_border < 0:
        raise ConfigError(f"{what}: crop_border must be an integer >= 0, got {crop_border!r}")
    c = int(crop_border)
    h, w = a.shape[:2]
    if c:
        if 2 * c >= h or 2 * c >= w:
            raise ConfigError(f"{what}: a {w}x{h} image has nothing left after cropping {c} px per side")
        a = a[c:-c, c:-c]
        b = b[c:-c, c:-c]
    if test_y_channel and a.shape[2] == 3:
        a = rgb_to_y(a)[..., None]
        b = rgb_to_y(b)[..., None]
    return a, b


def psnr(pred: np.ndarray, gt: np.ndarray, crop_border: int = 4, test_y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) of ``pred`` against ``gt``, both on the 0-255 scale.

    ``pred``/``gt``: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB arrays of the same shape.
    Returns ``inf`` for identical inputs. Raises ConfigError for bad shapes or a crop that
    leaves nothing.
    """
    a, b = _prepare(pred, gt, crop_border, test_y_channel, "psnr")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(255.0 * 255.0 / mse)


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation of the last two axes with ``outer(k, k)``, valid region only
    (what cv2.filter2D with that window gives, cropped by ``len(k) // 2`` on each side)."""
    n = k.size
    rows = sliding_window_view(x, n, axis=-2) @ k  # (..., H - n + 1, W)
    return sliding_window_view(rows, n, axis=-1) @ k  # (..., H - n + 1, W - n + 1)


def _ssim_plane(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> float:
    stats = _filter_valid(np.stack([a, b, a * a, b * b, a * b]), k)
    mu1, mu2, e11, e22, e12 = stats
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1, s2, s12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    ssim_map = ((2.0 * mu12 + _C1) * (2.0 * s12 + _C2)) / ((mu1_sq + mu2_sq + _C1) * (s1 + s2 + _C2))
    return float(ssim_map.mean())


def ssim(pred: np.ndarray, gt: np.ndarray, crop_border: int = 4, test_y_channel: bool = True) -> float:
    """SSIM of ``pred`` against ``gt``, both on the 0-255 scale (see the module docstring).

    ``pred``/``gt``: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB arrays of the same shape;
    at least 11x11 pixels must remain after the crop. RGB without ``test_y_channel``: the mean of
    the three channels' SSIMs. Raises ConfigError for bad shapes or too small an image.
    """
    a, b = _prepare(pred, gt, crop_border, test_y_channel, "ssim")
    h, w = a.shape[:2]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ConfigError(
            f"ssim: {w}x{h} pixels left after cropping {crop_border} px per side; "
            f"the {SSIM_WINDOW}x{SSIM_WINDOW} window needs at least {SSIM_WINDOW}x{SSIM_WINDOW}"
        )
    k = gaussian_kernel()
    return float(np.mean([_ssim_plane(a[..., c], b[..., c], k) for c in range(a.shape[2])]))
