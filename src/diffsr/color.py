"""Colour correction of a restored image against the (upsampled) input.

Both fixes follow the form used by the authors of PiSA-SR and S3Diff (from StableSR):
- AdaIN: per-image, per-channel mean and standard deviation of the output are replaced by
  those of the reference (unbiased variance + 1e-5, as the authors' `calc_mean_std`).
- Wavelet: a 5-level à-trous decomposition with the 3x3 binomial kernel [1,2,1]ᵀ[1,2,1]/16
  dilated by 2^i and replicate padding; the output keeps its high frequencies and takes the
  reference's lowest band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

COLOR_FIXES = ("adain", "wavelet", "none")


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x, ref: (B, C, H, W) float (any size each). Returns x with ref's channel mean/std."""
    xm, xs = _mean_std(x, eps)
    rm, rs = _mean_std(ref, eps)
    return (x - xm) / xs * rs + rm


def _mean_std(t: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.flatten(2)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean.to(t.dtype), std.to(t.dtype)


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Dilated 3x3 binomial blur with replicate padding; x: (B, C, H, W)."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (torch.outer(k1, k1) / 16).expand(x.shape[1], 1, 3, 3)
    xp = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(xp, kernel, groups=x.shape[1], dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (high, low) with high + low == x; low is the band after `levels` blurs."""
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2**i)
    return x - low, low


def wavelet(x: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """x, ref: (B, C, H, W) of the same shape. High frequencies of x + low band of ref."""
    if x.shape != ref.shape:
        raise ConfigError(
            f"wavelet colour fix needs equal shapes, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )
    return wavelet_decompose(x, levels)[0] + wavelet_decompose(ref, levels)[1]


def color_fix(x: torch.Tensor, ref: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply `mode` ('adain', 'wavelet' or 'none') and clamp to [0, 1]. x, ref in [0, 1]."""
    if mode == "adain":
        x = adain(x, ref)
    elif mode == "wavelet":
        x = wavelet(x, ref)
    elif mode != "none":
        raise ConfigError(f"color_fix={mode!r} is not one of {', '.join(COLOR_FIXES)}")
    return x.clamp(0, 1)
