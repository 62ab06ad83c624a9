"""Resampling with Pillow's kernels, computed in float.

The authors resize with PIL on 8-bit images (bicubic a=-0.5, Lanczos-3, antialiased when
shrinking). torch's bicubic uses a=-0.75, so it is not the same filter. We run Pillow's own
resampler on single-channel float ("F") images instead: the same kernels, without the 8-bit
rounding and intermediate clipping of the uint8 path (so 16-bit inputs keep their precision).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def pil_resize(x: torch.Tensor, size: tuple[int, int], method: str = "bicubic") -> torch.Tensor:
    """Resize a batch of images with Pillow's filter `method`.

    x: (B, C, H, W) float tensor (any range; no clipping is applied); size: (height, width).
    Returns a float tensor (B, C, height, width) on x's device and dtype.
    """
    if method not in _FILTERS:
        raise ConfigError(f"resize method {method!r} is not one of {sorted(_FILTERS)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ConfigError(f"resize target {h}x{w} is empty")
    if tuple(x.shape[-2:]) == (h, w):
        return x.clone()
    arr = x.detach().to("cpu", torch.float32).numpy()
    out = np.empty((*arr.shape[:2], h, w), dtype=np.float32)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            im = Image.fromarray(np.ascontiguousarray(arr[b, c]))  # float32 2-D -> mode "F"
            out[b, c] = np.asarray(im.resize((w, h), _FILTERS[method]))
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
