"""What the one-step methods (PiSA-SR, S3Diff) share: options, VAE encode/decode, tiling settings,
prompt embeddings, dtype policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..color import COLOR_FIXES
from ..devices import resolve_dtype
from ..errors import ConfigError
from ..latents import (
    LATENT_OVERLAP,
    LATENT_TILE,
    VAE_DECODER_TILE,
    VAE_ENCODER_TILE,
    vae_decode,
    vae_encode,
)
from ..vae_tiling import OFFLOADS


@dataclass
class RunOptions:
    """Per-call settings common to every method. `color_fix` None means the method's default."""

    color_fix: str | None = None
    tile_size: int = LATENT_TILE
    tile_overlap: int = LATENT_OVERLAP
    tile_batch: int = 4
    vae_encoder_tile: int = VAE_ENCODER_TILE
    vae_decoder_tile: int = VAE_DECODER_TILE
    vae_offload: str = "auto"
    sample_posterior: bool = False
    seed: int | None = None
    progress: Callable[[dict], None] | None = None

    def tiling(self) -> dict:
        """Keyword arguments for latents.tiled_predict."""
        return dict(
            tile=self.tile_size, overlap=self.tile_overlap, batch_size=self.tile_batch, progress=self.progress
        )


class LatentSR:
    """Base of the one-step latent methods: subclasses set name/default_color_fix, `unet`, `vae`,
    `device`, `dtype`, and implement `restore(lr, **options) -> (sr, info)`."""

    name: str
    scale = 4
    batchable = True  # restore() takes (B, 3, h, w): Upscaler.process_batch
    default_color_fix = "adain"
    unet: torch.nn.Module
    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    def options(self, options: dict) -> RunOptions:
        """Validate the generic options of one call (None values mean 'default')."""
        names = {f.name for f in fields(RunOptions)}
        unknown = set(options) - names
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s): {', '.join(sorted(unknown))}")
        opts = RunOptions(**{k: v for k, v in options.items() if v is not None})
        if opts.color_fix is None:
            opts.color_fix = self.default_color_fix
        if opts.color_fix not in COLOR_FIXES:
            raise ConfigError(f"color_fix={opts.color_fix!r} is not one of {', '.join(COLOR_FIXES)}")
        for k in ("tile_size", "tile_batch", "vae_encoder_tile", "vae_decoder_tile"):
            if getattr(opts, k) < 1:
                raise ConfigError(f"{k}={getattr(opts, k)} must be >= 1")
        if opts.vae_offload not in OFFLOADS:
            raise ConfigError(f"vae_offload={opts.vae_offload!r} is not one of {', '.join(OFFLOADS)}")
        if not 0 <= opts.tile_overlap < opts.tile_size:
            raise ConfigError(f"tile_overlap={opts.tile_overlap} must be in [0, tile_size={opts.tile_size})")
        return opts

    def encode(self, x: torch.Tensor, opts: RunOptions) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] → scaled latents z (B, 4, H/8, W/8) fp32 (posterior mode unless
        `sample_posterior`, then seeded by `seed`: each image draws from its own generator, so an
        image in a batch gets the noise it gets alone)."""
        gen = None
        if opts.sample_posterior:
            gens = [torch.Generator(self.device) for _ in range(x.shape[0])]
            for g in gens:
                if opts.seed is None:
                    g.seed()
                else:
                    g.manual_seed(opts.seed)
            gen = gens[0] if len(gens) == 1 else gens
        z = vae_encode(
            self.vae,
            x.to(self.device),
            sample=opts.sample_posterior,
            generator=gen,
            tile=opts.vae_encoder_tile,
            offload=opts.vae_offload,
        )
        return z.float()

    def decode(self, z: torch.Tensor, opts: RunOptions) -> torch.Tensor:
        """z (1, 4, h, w) → image (1, 3, 8h, 8w) in [0, 1], fp32."""
        x = vae_decode(self.vae, z, tile=opts.vae_decoder_tile, offload=opts.vae_offload)
        return (x.float() + 1) / 2


def vae_dtype_for(vae_dtype, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE stays fp32 when the model runs in fp16 (SD's VAE overflows in fp16 at large sizes)."""
    if vae_dtype is not None:
        return resolve_dtype(vae_dtype, device)
    return torch.float32 if dtype == torch.float16 else dtype
