"""The Python API: `diffsr.load(method, ...)` → an `Upscaler` whose `upscale` takes and returns
PIL images, NumPy arrays or torch tensors (the same kind it was given).

The CLI and the web page are thin layers over this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ImageError
from .io import ImageData, from_array, from_pil, to_array, to_pil
from .methods import METHODS, get_method
from .resize import pil_resize


def load(
    method: str = "pisa",
    *,
    weights: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
) -> Upscaler:
    """Load a method's model. weights: the method's checkpoint (file or diffsr folder); base: the
    Stable Diffusion base (Hub id or local folder); device: 'cpu', 'cuda', 'cuda:N' or None (auto);
    dtype: 'fp32' (default), 'bf16', 'fp16' (CUDA only). Method-specific keyword arguments are
    passed to the method's `from_pretrained`."""
    cls = get_method(method)
    return Upscaler(cls.from_pretrained(weights, base=base, device=device, dtype=dtype, **kwargs))


def available_methods() -> list[str]:
    return list(METHODS)


ProgressFn = Callable[[dict], None]


class Upscaler:
    """A loaded SR model with image-level conveniences (alpha, grayscale, bit depth, output scale).

    `model` is a method object (e.g. `diffsr.methods.pisa.PiSASR`) with `restore(lr, **options)`
    mapping a (1, 3, h, w) tensor in [0, 1] to (1, 3, scale·h, scale·w)."""

    def __init__(self, model):
        self.model = model
        self.method: str = model.name
        self.scale: int = model.scale

    def __repr__(self) -> str:
        return f"Upscaler(method={self.method!r}, scale={self.scale}, device={self.model.device}, dtype={self.model.dtype})"

    def upscale(self, image, *, outscale: float | None = None, return_info: bool = False, **options: Any):
        """Super-resolve `image` (PIL.Image, NumPy array (H,W[,C]) uint8/uint16/float in [0,1], or
        tensor (C,H,W)/(B,C,H,W) float in [0,1], C in {1,3,4}). Returns the same kind, `outscale`×
        larger (default: the method's native ×4); with return_info, also a dict of what the method
        used or estimated (for a batch of tensors: a list of dicts). Options are the method's (e.g.
        lambda_pix, lambda_sem, blur, noise, color_fix, tile_size, seed, progress)."""
        infos: list[dict] = []

        def run(data: ImageData) -> ImageData:
            out, info = self.process(data, outscale=outscale, **options)
            infos.append(info)
            return out

        result = _convert(image, run)
        if not return_info:
            return result
        return result, (infos if isinstance(image, torch.Tensor) and image.dim() == 4 else infos[0])

    def process(
        self, data: ImageData, *, outscale: float | None = None, **options: Any
    ) -> tuple[ImageData, dict]:
        """ImageData in → (ImageData, info) out (used by the CLI). Alpha is upscaled separately
        (bicubic); grayscale input gives grayscale output (ITU-R 601 luma of the result)."""
        y, info = self.model.restore(_rgb_tensor(data), **options)
        return _finish(y, data, outscale, self.scale), info

    def process_batch(
        self,
        datas: Sequence[ImageData],
        *,
        batch_size: int | None = None,
        outscale: float | None = None,
        **options: Any,
    ) -> list[tuple[ImageData, dict]]:
        """Several images of one size through the model as ONE batch (PiSA-SR, S3Diff): VAE encode,
        UNet and decode run on (batch_size, 3, h, w). Fewer images than `batch_size` are padded with
        copies of the last, so every image is computed at the same batch size: its result depends on
        it alone (not on the other images, their order or how a folder was split into batches) and
        is the same bits on every run. Against one-by-one processing (batch size 1) the results
        agree to float rounding (CPU kernels pick their blocking by batch size), not bit for bit.
        Returns [(ImageData, info)] in the order given."""
        if not datas:
            return []
        if not getattr(self.model, "batchable", False):
            raise ConfigError(
                f"method {self.method!r} processes one image at a time (batching: pisa, s3diff)"
            )
        n = len(datas)
        size = batch_size if batch_size is not None else n
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        if n > size:
            raise ConfigError(f"{n} images do not fit batch_size={size}")
        shapes = {d.pixels.shape[:2] for d in datas}
        if len(shapes) > 1:
            sizes = ", ".join(f"{w}x{h}" for h, w in sorted(shapes))
            raise ConfigError(f"a batch needs images of one size, got {sizes}")
        lr = torch.cat([_rgb_tensor(d) for d in datas] + [_rgb_tensor(datas[-1])] * (int(size) - n))
        y, info = self.model.restore(lr, **options)
        out = []
        for i, d in enumerate(datas):
            info_i = {k: (v[i] if isinstance(v, list) else v) for k, v in info.items()}
            out.append((_finish(y[i : i + 1], d, outscale, self.scale), info_i))
        return out

    def adjustable(self, image, **options: Any) -> AdjustableImage:
        """PiSA-SR only: run the UNet once and get an object whose `render(lambda_pix, lambda_sem)`
        returns the image for any λ without running the UNet again."""
        if not hasattr(self.model, "adjustable"):
            raise ConfigError(f"method {self.method!r} has no adjustable mode (PiSA-SR has)")
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] != 1:
            raise ConfigError("adjustable() takes one image; got a batch of tensors")
        holder: dict = {}

        def run(data: ImageData) -> ImageData:
            holder["data"] = data
            holder["state"] = self.model.adjustable(_rgb_tensor(data), **options)
            return data

        _convert(image, run)
        return AdjustableImage(holder["state"], holder["data"], image, self.scale)


@dataclass
class AdjustableImage:
    """The stored UNet outputs of one adjustable run, re-rendered for any (λ_pix, λ_sem)."""

    state: Any
    data: ImageData
    like: Any
    scale: int

    def render(
        self,
        lambda_pix: float = 1.0,
        lambda_sem: float = 1.0,
        *,
        outscale: float | None = None,
        color_fix: str | None = None,
    ):
        """Latent update + VAE decode only. Returns the same kind as the image given to `adjustable`."""
        y = self.state.render(lambda_pix, lambda_sem, color_fix=color_fix)
        out = _finish(y, self.data, outscale, self.scale)
        return _convert(self.like, lambda _data: out)


# ---------------------------------------------------------------- conversions
def _rgb_tensor(data: ImageData) -> torch.Tensor:
    px = data.pixels
    if px.shape[-1] == 1:
        px = np.repeat(px, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(px.transpose(2, 0, 1)))[None].float()


def _finish(y: torch.Tensor, data: ImageData, outscale: float | None, scale: int) -> ImageData:
    """y: (1, 3, scale·h, scale·w) in [0, 1] → ImageData at outscale·(h, w), with alpha and gray restored."""
    h, w = data.pixels.shape[:2]
    if outscale is not None:
        if not outscale > 0:
            raise ConfigError(f"outscale={outscale} must be > 0")
        size = (max(1, round(h * outscale)), max(1, round(w * outscale)))
        if size != tuple(y.shape[-2:]):
            y = pil_resize(y, size, "lanczos").clamp(0, 1)
    px = y[0].permute(1, 2, 0).numpy()
    if data.pixels.shape[-1] == 1:
        px = (px @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    alpha = None
    if data.alpha is not None:
        a = torch.from_numpy(np.ascontiguousarray(data.alpha))[None, None].float()
        alpha = pil_resize(a, px.shape[:2], "bicubic").clamp(0, 1)[0, 0].numpy()
    return replace(data, pixels=np.ascontiguousarray(px, dtype=np.float32), alpha=alpha)


def _convert(image, fn: Callable[[ImageData], ImageData]):
    """Apply fn to `image` as ImageData and return the result in `image`'s own kind."""
    from PIL import Image

    if isinstance(image, ImageData):
        return fn(image)
    if isinstance(image, Image.Image):
        return to_pil(fn(from_pil(image)))
    if isinstance(image, np.ndarray):
        return to_array(fn(from_array(image)), like=image)
    if isinstance(image, torch.Tensor):
        return _convert_tensor(image, fn)
    raise ImageError(
        f"unsupported image type {type(image).__name__} (use a PIL image, NumPy array or tensor)"
    )


def _convert_tensor(t: torch.Tensor, fn: Callable[[ImageData], ImageData]) -> torch.Tensor:
    if not t.is_floating_point():
        raise ImageError(f"tensor images must be float in [0, 1], got {t.dtype}")
    batched = t.dim() == 4
    if t.dim() not in (3, 4) or t.shape[-3] not in (1, 3, 4):
        raise ImageError(
            f"tensor image shape {tuple(t.shape)} is not (C, H, W) or (B, C, H, W) with C in 1, 3, 4"
        )
    outs = []
    for x in t if batched else t[None]:
        arr = x.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
        res = fn(from_array(arr))
        ch = [res.pixels] + ([res.alpha[..., None]] if res.alpha is not None else [])
        outs.append(torch.from_numpy(np.concatenate(ch, axis=-1)).permute(2, 0, 1))
    out = torch.stack(outs).to(t.device, t.dtype)
    return out if batched else out[0]
