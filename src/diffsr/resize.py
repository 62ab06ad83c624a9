"""Resampling with Pillow's kernels, computed in float.

The authors resize with PIL on 8-bit images (bicubic a=-0.5, Lanczos-3, antialiased when
shrinking). torch's plain bicubic uses a=-0.75, a different filter; its antialiased bicubic and
bilinear are Pillow's (a=-0.5), equal to Pillow's float resampler to ~1e-6, so those run on the
tensor's own device. Lanczos and nearest run Pillow's own resampler on single-channel float ("F")
images. Both keep float precision: no 8-bit rounding or intermediate clipping (8-bit inputs that
must match the authors' uint8 path exactly go through Pillow's uint8 path instead, see
methods/pisa.preprocess).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def pil_resize(x: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize a batch of images with Pillow's filter `method`.

    x: (B, C, H, W) float tensor (any range; no clipping is applied); size: (height, width).
    Returns a float tensor (B, C, height, width) on x's device and dtype (bicubic and bilinear are
    computed there; lanczos and nearest on the CPU).
    """
    if method not in PIL_FILTERS:
        raise ConfigError(f"resize method {method!r} is not one of {sorted(PIL_FILTERS)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ConfigError(f"resize target {h}x{w} is empty")
    if tuple(x.shape[-2:]) == (h, w):
        return x.clone()
    if method in ("bicubic", "bilinear"):
        y = F.interpolate(x.float(), size=(h, w), mode=method, antialias=True, align_corners=False)
        return y.to(x.dtype)
    arr = x.detach().to("cpu", torch.float32).numpy()
    out = np.empty((*arr.shape[:2], h, w), dtype=np.float32)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            im = Image.fromarray(np.ascontiguousarray(arr[b, c]))  # float32 2-D -> mode "F"
            out[b, c] = np.asarray(im.resize((w, h), PIL_FILTERS[method]))
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
