"""NIQE (Mittal et al., "Making a 'completely blind' image quality analyzer", 2013), computed as
the authors' MATLAB release (``niqe_release``: ``computequality.m``) does, in float64 NumPy.

The algorithm:

* the image is reduced to one 0-255 channel and rounded to integer levels: the Y of YCbCr
  (MATLAB ``rgb2ycbcr``, BasicSR's ``convert_to='y'``) or the Y of YIQ
  (``0.299 R + 0.587 G + 0.114 B``, pyiqa's ``niqe``); a gray image is used as it is;
* it is cropped to whole 96x96 blocks (top-left kept);
* at two scales (the image, then MATLAB's ``imresize(im, 0.5)``: bicubic with antialiasing and
  mirrored borders), the MSCN coefficients ``(I - mu) / (sigma + 1)`` are formed with a 7x7
  Gaussian (sigma 7/6, normalised, replicated borders) and, per block (96/scale pixels a side),
  18 features are fitted: the AGGD shape and mean scale of the coefficients, and shape, mean,
  left and right scale of their products with the horizontal, vertical and two diagonal
  (circularly shifted) neighbours; the AGGD shape is the best of the grid 0.2:0.001:10;
* the 36-dimensional features of the blocks give a mean and a covariance (rows with a NaN left
  out of the covariance, as MATLAB's ``nancov``; zero with fewer than two such rows), and the score is
  ``sqrt((mu_p - mu_d) pinv((C_p + C_d) / 2) (mu_p - mu_d)^T)`` against the pristine model.

The pristine model (a 36-vector and a 36x36 matrix, fitted by the authors on 125 pristine images)
is not part of diffsr: :func:`load_niqe_params` reads it from BasicSR's ``niqe_pris_params.npz``
or from the MATLAB release's ``modelparameters.mat`` (pyiqa's ``niqe_modelparameters.mat`` is
the same file), and :func:`find_niqe_params` looks for one where they are installed.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from diffsr.errors import ConfigError

from .psnr_ssim import gaussian_kernel, rgb_to_y

__all__ = [
    "BLOCK",
    "NIQE_PARAMS_ENV",
    "NiqeParams",
    "find_niqe_params",
    "imresize_matlab",
    "load_niqe_params",
    "niqe",
    "niqe_gray",
]

BLOCK: int = 96
"""Block side in pixels at the first scale (the release's recommended 96, no overlap)."""
NIQE_PARAMS_ENV = "DIFFSR_NIQE_PARAMS"
"""Environment variable naming a pristine-model file; checked before the installed packages."""
YIQ_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
_WINDOW = gaussian_kernel(7, 7.0 / 6.0)  # the release's fspecial('gaussian', 7, 7/6), separable


@dataclass(frozen=True)
class NiqeParams:
    """The pristine multivariate Gaussian: ``mu`` (36,) and ``cov`` (36, 36), float64."""

    mu: np.ndarray
    cov: np.ndarray
    source: str = ""


def load_niqe_params(path: str | os.PathLike) -> NiqeParams:
    """Read a pristine model: BasicSR's ``.npz`` (``mu_pris_param``, ``cov_pris_param``) or the
    MATLAB release's ``.mat`` (``mu_prisparam``, ``cov_prisparam``; needs SciPy)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: NIQE parameter file not found")
    try:
        if p.suffix.lower() == ".mat":
            try:
                from scipy.io import loadmat
            except ImportError:
                raise ConfigError(f"{p}: reading a .mat file needs SciPy (pip install scipy)") from None
            keys = ("mu_prisparam", "cov_prisparam")
            d = loadmat(str(p))
            found = {k: d[k] for k in keys if k in d}
        else:
            keys = ("mu_pris_param", "cov_pris_param")
            with np.load(p) as d:
                found = {k: d[k] for k in keys if k in d.files}
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{p}: cannot read NIQE parameters ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in found]
    if missing:
        raise ConfigError(f"{p}: not a NIQE parameter file (no {missing[0]!r} entry)")
    mu = np.asarray(found[keys[0]], dtype=np.float64).reshape(-1)
    cov = np.asarray(found[keys[1]], dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise ConfigError(
            f"{p}: NIQE parameters must be a 36-vector and a 36x36 matrix, got {mu.shape} and {cov.shape}"
        )
    return NiqeParams(mu, cov, str(p))


def _candidates() -> list[Path]:
    out = []
    env = os.environ.get(NIQE_PARAMS_ENV)
    if env:
        out.append(Path(env))
    # BasicSR ships the release's parameters as package data; its import is not needed (and fails
    # with current torchvision), only where it is installed.
    spec = importlib.util.find_spec("basicsr")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        out.append(Path(loc) / "metrics" / "niqe_pris_params.npz")
    # pyiqa's cache, where its `niqe` metric downloaded the release's file on first use
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    out.append(Path(torch_home) / "hub" / "pyiqa" / "niqe_modelparameters.mat")
    return out


def find_niqe_params() -> NiqeParams:
    """The pristine model from ``$DIFFSR_NIQE_PARAMS``, else an installed BasicSR, else pyiqa's
    download cache. Raises ConfigError (one line, with the ways to provide one) when none exists."""
    cands = _candidates()
    env = os.environ.get(NIQE_PARAMS_ENV)
    if env and not Path(env).is_file():
        raise ConfigError(f"{NIQE_PARAMS_ENV}={env}: NIQE parameter file not found")
    for c in cands:
        if c.is_file():
            return load_niqe_params(c)
    raise ConfigError(
        "NIQE needs the pristine model of the MATLAB release, which was not found: give a file "
        f"(BasicSR's niqe_pris_params.npz or the release's modelparameters.mat) with {NIQE_PARAMS_ENV}, "
        "or install BasicSR, which ships it, without its dependencies: "
        "pip install --no-deps --no-build-isolation basicsr==1.4.2"
    )


# --------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic, antialiased when shrinking)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, MATLAB's ``cubic``."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def _contributions(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (n_out, P) and 0-based source indices (n_out, P) of one axis, as MATLAB computes
    them: kernel widened by 1/scale when shrinking, indices mirrored at the borders."""
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # 1-based source coordinate of each output pixel
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    d = u[:, None] - idx
    w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    keep = np.any(w != 0, axis=0)
    return w[:, keep], src[:, keep]


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB's ``imresize(img, scale)`` (bicubic) for a 2-D float array; output ``ceil(h*scale)``
    by ``ceil(w*scale)``, float64, not clipped or rounded. Rows are resized first (equal scales)."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"imresize_matlab needs a 2-D array, got shape {a.shape}")
    h, w = a.shape
    wr, sr = _contributions(h, math.ceil(h * scale), scale)
    a = np.einsum("op,opw->ow", wr, a[sr])
    wc, sc = _contributions(w, math.ceil(w * scale), scale)
    return np.einsum("op,hop->ho", wc, a[:, sc])


# --------------------------------------------------------------------------------------------
# features


@lru_cache(maxsize=1)
def _aggd_grid() -> tuple[np.ndarray, np.ndarray]:
    gam = 0.2 + 0.001 * np.arange(9801, dtype=np.float64)  # MATLAB 0.2:0.001:10
    g = np.array([math.gamma(1.0 / a) for a in gam])
    g2 = np.array([math.gamma(2.0 / a) for a in gam])
    g3 = np.array([math.gamma(3.0 / a) for a in gam])
    return gam, g2 * g2 / (g * g3)


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AGGD fit of each row of ``x`` (n, m): shape alpha, left and right scale (n,) each.
    A row without negative (or positive) values gives NaN scales and alpha 0.2, as MATLAB's
    ``min`` over an all-NaN vector returns its first index."""
    gam, r_gam = _aggd_grid()
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.where(neg, x * x, 0.0).sum(1) / neg.sum(1))
        right = np.sqrt(np.where(pos, x * x, 0.0).sum(1) / pos.sum(1))
        g = left / right
        rhat = np.mean(np.abs(x), axis=1) ** 2 / np.mean(x * x, axis=1)
        rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    err = (r_gam[None, :] - rnorm[:, None]) ** 2
    pos_min = np.where(np.isnan(rnorm), 0, np.argmin(np.where(np.isnan(err), np.inf, err), axis=1))
    alpha = gam[pos_min]
    ratio = np.sqrt(np.array([math.gamma(1.0 / a) / math.gamma(3.0 / a) for a in alpha]))
    return alpha, left * ratio, right * ratio


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 features of each block of ``blocks`` (n, b, b): (n, 18)."""
    n = blocks.shape[0]
    flat = blocks.reshape(n, -1)
    alpha, bl, br = _aggd(flat)
    feats = [alpha, (bl + br) / 2.0]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        prod = (blocks * np.roll(blocks, shift, axis=(1, 2))).reshape(n, -1)
        alpha, bl, br = _aggd(prod)
        ratio = np.array([math.gamma(2.0 / a) / math.gamma(1.0 / a) for a in alpha])
        feats += [alpha, (br - bl) * ratio, bl, br]
    return np.stack(feats, axis=1)


def _gauss_replicate(a: np.ndarray) -> np.ndarray:
    """Correlation with the 7x7 window (separable), borders replicated."""
    p = np.pad(a, 3, mode="edge")
    k = _WINDOW
    rows = sum(k[i] * p[i : i + a.shape[0], :] for i in range(7))
    return sum(k[j] * rows[:, j : j + a.shape[1]] for j in range(7))


def _mscn(a: np.ndarray) -> np.ndarray:
    mu = _gauss_replicate(a)
    sigma = np.sqrt(np.abs(_gauss_replicate(a * a) - mu * mu))
    return (a - mu) / (sigma + 1.0)


def _blocks(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[0] // size, a.shape[1] // size
    return a[: h * size, : w * size].reshape(h, size, w, size).transpose(0, 2, 1, 3).reshape(-1, size, size)


def niqe_gray(img: np.ndarray, params: NiqeParams, block: int = BLOCK) -> float:
    """NIQE of a 2-D float array on the 0-255 scale (used as given: round it first to follow the
    release). Needs at least one ``block`` x ``block`` block; lower is better."""
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"niqe_gray needs a 2-D array, got shape {a.shape}")
    nh, nw = a.shape[0] // block, a.shape[1] // block
    if nh < 1 or nw < 1:
        raise ConfigError(
            f"NIQE needs an image of at least {block}x{block} pixels, got {a.shape[1]}x{a.shape[0]}"
        )
    a = a[: nh * block, : nw * block]
    feats = []
    for scale in (1, 2):
        feats.append(_block_features(_blocks(_mscn(a), block // scale)))
        if scale == 1:
            a = imresize_matlab(a, 0.5)
    f = np.concatenate(feats, axis=1)
    with np.errstate(invalid="ignore"):
        mu_d = np.nanmean(f, axis=0)
    clean = f[~np.isnan(f).any(axis=1)]
    # One complete block has no spread: its covariance is zero (as pyiqa). MATLAB's nancov would
    # read a single 1x36 row as 36 samples of one variable and add their variance everywhere.
    cov_d = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros((36, 36))
    diff = params.mu - mu_d
    q = diff @ np.linalg.pinv((params.cov + cov_d) / 2.0) @ diff
    return float(np.sqrt(q))


def niqe(
    img: np.ndarray,
    params: NiqeParams | None = None,
    *,
    color_space: str = "ycbcr",
    crop_border: int = 0,
) -> float:
    """NIQE of an image on the 0-255 scale, ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` RGB.

    ``color_space``: ``"ycbcr"`` (MATLAB / BasicSR's Y) or ``"yiq"`` (pyiqa's ``niqe``) for an RGB
    image; the channel is rounded to integer levels. ``crop_border`` pixels are removed from each
    side first. ``params``: None looks one up with :func:`find_niqe_params`.
    """
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 3:
        if color_space == "ycbcr":
            a = rgb_to_y(a)
        elif color_space == "yiq":
            wr, wg, wb = YIQ_WEIGHTS
            a = wr * a[..., 0] + wg * a[..., 1] + wb * a[..., 2]
        else:
            raise ConfigError(f"color_space must be 'ycbcr' or 'yiq', got {color_space!r}")
    elif a.ndim != 2:
        raise ConfigError(f"niqe needs an (H, W), (H, W, 1) or (H, W, 3) array, got shape {a.shape}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
    return niqe_gray(np.round(a), params if params is not None else find_niqe_params())
