"""VAE encode/decode (optionally tiled) and tiled latent prediction with Gaussian blending.

Importing this module is cheap (diffusers loads on the first VAE call): PatchScaler's sampler
shares its tile grid and Gaussian weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import ConfigError
from .vae_tiling import tiled_forward

ProgressFn = Callable[[dict], None]

# Official latent-tiling defaults (PiSA-SR / S3Diff inference scripts).
LATENT_TILE = 96
LATENT_OVERLAP = 32
# VAE tiles. The authors use 1024 image pixels (encoder) and 224 latent pixels (decoder), with context
# pads, because their tiling is approximate and memory grows with the tile. diffsr's tiling is exact
# (vae_tiling.py), so the tile size changes only speed and memory: these bound the peak near that of
# an untiled 512×512 image.
VAE_ENCODER_TILE = 512  # image pixels
VAE_DECODER_TILE = 64  # latent pixels


def vae_factor(vae) -> int:
    """Spatial downsampling factor of a diffusers AutoencoderKL (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def vae_encode(
    vae,
    x: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    tile: int = VAE_ENCODER_TILE,
    offload: str = "auto",
) -> torch.Tensor:
    """x: (B, 3, H, W) in [-1, 1], H and W multiples of the VAE factor. Returns scaled latents
    (B, 4, H/8, W/8) in the VAE's dtype: the posterior mode, or a sample drawn with `generator`
    (one per image: a list of B).

    Tiled exactly (vae_tiling.tiled_forward; `offload` says where activations wait between layers)
    when H or W exceeds `tile` pixels."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    f = vae_factor(vae)
    if x.shape[-1] % f or x.shape[-2] % f:
        raise ConfigError(f"VAE input {tuple(x.shape[-2:])} is not a multiple of {f}")
    x = x.to(vae.dtype)
    h = tiled_forward(vae.encoder, x, tile=tile, offload=offload)
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    dist = DiagonalGaussianDistribution(h)
    z = dist.sample(generator) if sample else dist.mode()
    return z * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae, z: torch.Tensor, *, tile: int = VAE_DECODER_TILE, offload: str = "auto") -> torch.Tensor:
    """z: scaled latents (B, 4, h, w). Returns images (B, 3, 8h, 8w) in [-1, 1] (clamped), VAE dtype.

    Tiled exactly (vae_tiling.tiled_forward) when h or w exceeds `tile` latent pixels."""
    z = (z / vae.config.scaling_factor).to(vae.dtype)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    x = tiled_forward(vae.decoder, z, tile=tile, offload=offload)
    return x.clamp(-1, 1)


def gaussian_weights(height: int, width: int, device=None) -> torch.Tensor:
    """(height, width) float32 weights exp(-d²/2σ²) per axis with σ = 0.1·size (the authors' form)."""

    def axis(n: int) -> torch.Tensor:
        t = torch.arange(n, dtype=torch.float64, device=device)
        mid = (n - 1) / 2
        return torch.exp(-((t - mid) ** 2) / (2 * (0.1 * n) ** 2))

    return torch.outer(axis(height), axis(width)).float()


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets 0, stride, 2·stride, … with the last tile snapped to the border (the authors' grid)."""
    if size <= tile:
        return [0]
    n = math.ceil((size - tile) / stride) + 1
    starts = [i * stride for i in range(n - 1)] + [size - tile]
    return sorted(set(starts))


def needs_tiling(z: torch.Tensor, tile: int) -> bool:
    """The authors' rule: tile when the latent area exceeds tile²."""
    return z.shape[-2] * z.shape[-1] > tile * tile


def tiled_predict(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    tile: int = LATENT_TILE,
    overlap: int = LATENT_OVERLAP,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Apply a latent-to-latent predictor `fn` over overlapping tiles and blend the predictions.

    z: (B, C, H, W). fn maps (n, C, th, tw) → (n, C', th, tw) and is called on up to `batch_size`
    tiles (× B) at a time. Tiles are `tile` latent pixels per side, clamped per axis to the latent
    (so long thin images get rectangular tiles), stride tile − overlap, the last row/column snapped
    to the border. Each prediction is weighted by a Gaussian of the tile's own shape (σ = 0.1·side)
    and the sum normalised by the summed weights. A latent of area ≤ tile² is predicted in one call.
    Returns (B, C', H, W) float32.
    """
    if overlap < 0 or overlap >= tile:
        raise ConfigError(f"tile overlap {overlap} must be in [0, tile size {tile})")
    b, _, height, width = z.shape
    if not needs_tiling(z, tile):
        if progress:
            progress({"stage": "tiles", "done": 1, "total": 1})
        return fn(z).float()
    th, tw = min(tile, height), min(tile, width)
    stride = tile - overlap
    boxes = [(y, x) for y in tile_starts(height, th, stride) for x in tile_starts(width, tw, stride)]
    weight = gaussian_weights(th, tw, device=z.device)
    out = wsum = None
    if progress:  # the bar shows before the first (slow) batch
        progress({"stage": "tiles", "done": 0, "total": len(boxes)})
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        pred = fn(torch.cat([z[:, :, y : y + th, x : x + tw] for y, x in chunk])).float()
        if out is None:
            out = z.new_zeros((b, pred.shape[1], height, width), dtype=torch.float32)
            wsum = z.new_zeros((1, 1, height, width), dtype=torch.float32)
        for k, (y, x) in enumerate(chunk):
            out[:, :, y : y + th, x : x + tw] += pred[k * b : (k + 1) * b] * weight
            wsum[:, :, y : y + th, x : x + tw] += weight
        if progress:
            progress({"stage": "tiles", "done": min(i + batch_size, len(boxes)), "total": len(boxes)})
    return out / wsum
