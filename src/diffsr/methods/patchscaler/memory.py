"""The texture-memory artifact: the frozen texture classifier together with the reference texture
memory built with it (the keys only make sense with the classifier that made them).

Folder layout: `classifier/` (TextureClassifier.save) and `rtm/` (ReferenceTextureMemory.save).
Built by `diffsr build-rtm`; read by PatchScaler training (inference reads it from the model folder)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ...errors import ConfigError, WeightsNotFoundError, hint
from .texture import ReferenceTextureMemory, TextureClassifier, build_rtm, select_texture_crops


def save_texture_memory(
    folder: str | os.PathLike, classifier: TextureClassifier, rtm: ReferenceTextureMemory
) -> Path:
    folder = Path(folder)
    classifier.save(folder / "classifier")
    rtm.save(folder / "rtm")
    return folder


def load_texture_memory(folder: str | os.PathLike) -> tuple[TextureClassifier, ReferenceTextureMemory]:
    folder = Path(folder).expanduser()
    if not (folder / "classifier").is_dir() or not (folder / "rtm").is_dir():
        raise WeightsNotFoundError(
            f"{folder}: not a texture memory (needs classifier/ and rtm/; make one with diffsr build-rtm)"
        )
    return TextureClassifier.load(folder / "classifier").eval().requires_grad_(
        False
    ), ReferenceTextureMemory.load(folder / "rtm")


@torch.no_grad()
def encode_crops(vae, crops: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """HR crops (N,3,S,S) in [0,1] → SD-VAE latents (N,4,S/8,S/8) (posterior mode, scaled)."""
    out = []
    for i in range(0, crops.shape[0], batch_size):
        x = crops[i : i + batch_size].to(vae.device, vae.dtype) * 2 - 1
        out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 4, crops.shape[-2] // 8, crops.shape[-1] // 8)


def build_texture_memory(
    images: Iterable[torch.Tensor],
    vae,
    classifier: TextureClassifier,
    *,
    pool: int = 20000,
    size: int = 2000,
    crop: int = 128,
    seed: int = 0,
    min_std: float = 0.02,
    log: Callable[[str], None] | None = None,
) -> ReferenceTextureMemory:
    """Algorithm of §3.3: `pool` random textured HR crops (paper: 20,000) → VAE latents (RTM-value) →
    classifier keys → farthest point sampling down to `size` pairs (paper: 2,000). Deterministic."""
    g = torch.Generator().manual_seed(seed)
    images = list(images)
    if not images:
        raise ConfigError("build-rtm found no images")
    per_image = max(1, -(-pool // len(images)))
    crops = []
    for img in images:
        c = select_texture_crops(img[None] if img.dim() == 3 else img, crop=crop, per_image=per_image,
                                 min_std=min_std, generator=g)  # fmt: skip
        crops.append(c)
    crops = torch.cat(crops)[:pool]
    if crops.shape[0] < size:
        raise ConfigError(
            f"only {crops.shape[0]} textured crops found; need at least {size} (more images or a smaller {hint('size=', '--size')})"
        )
    if log:
        log(f"encoding {crops.shape[0]} crops of {crop}x{crop} px")
    values = encode_crops(vae, crops)
    return build_rtm(values, classifier, size=size)
