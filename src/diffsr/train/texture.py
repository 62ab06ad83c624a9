"""Training PatchScaler's texture classifier (PATCHSCALER.md D9): a small CNN on SD-VAE latents of
128×128 crops, trained to classify textures (DTD's 47 classes in the recommended setup, one folder per
class), or procedural textures (stripes, checkers, dots, …) where no texture dataset is at hand."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, hint


def class_folders(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """DTD-style layout: ROOT/<class>/<image>. Returns (class names, [(path, class index)])."""
    from ..io import find_images

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [(src, i) for i, c in enumerate(classes) for src, _ in find_images([root / c])]
    if len(classes) < 2 or not items:
        raise ConfigError(
            f"{root}: expected one sub-folder of images per texture class (at least two classes)"
        )
    return classes, items


def _random_crops(items, n: int, crop: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from ..io import read_image

    imgs, labels = [], []
    while len(imgs) < n:
        path, label = items[rng.integers(len(items))]
        px = read_image(path, max_pixels=None).pixels
        if px.shape[-1] == 1:
            px = np.repeat(px, 3, axis=-1)
        if px.shape[0] < crop or px.shape[1] < crop:
            px = np.pad(
                px, ((0, max(0, crop - px.shape[0])), (0, max(0, crop - px.shape[1])), (0, 0)), mode="reflect"
            )
        y, x = rng.integers(px.shape[0] - crop + 1), rng.integers(px.shape[1] - crop + 1)
        imgs.append(torch.from_numpy(np.ascontiguousarray(px[y : y + crop, x : x + crop].transpose(2, 0, 1))))
        labels.append(label)
    return torch.stack(imgs), torch.tensor(labels)


def train_texture_classifier(
    vae,
    *,
    data: str | os.PathLike | None = None,
    procedural: bool = False,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    crop: int = 128,
    widths: tuple[int, ...] = (64, 128, 256, 256),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
):
    """Train a TextureClassifier on VAE latents of texture crops; returns (classifier, class names, accuracy
    on a held-out batch)."""
    from ..methods.patchscaler.memory import encode_crops
    from ..methods.patchscaler.procedural import TEXTURE_KINDS, procedural_dataset
    from ..methods.patchscaler.texture import TextureClassifier

    if procedural == (data is not None):
        raise ConfigError(f"give either a texture folder ({hint('data=', '--data')}) or "
                          f"{hint('procedural=True', '--procedural')}")  # fmt: skip
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    if procedural:
        classes = list(TEXTURE_KINDS)

        def batch(n):
            x, y = procedural_dataset(max(1, n // len(classes)) + 1, crop, generator=g)
            perm = torch.randperm(x.shape[0], generator=g)[:n]
            return x[perm], y[perm]
    else:
        classes, items = class_folders(data)

        def batch(n):
            return _random_crops(items, n, crop, rng)

    device = vae.device
    model = TextureClassifier(
        in_channels=vae.config.latent_channels, num_classes=len(classes), widths=widths
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        x, y = batch(batch_size)
        z = encode_crops(vae, x).to(device)
        loss = F.cross_entropy(model(z), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps):
            log(f"step {step}/{steps} loss={loss.item():.4f}")
    model.eval()
    x, y = batch(max(batch_size, 64))
    with torch.no_grad():
        acc = (model(encode_crops(vae, x).to(device)).argmax(1).cpu() == y).float().mean().item()
    return model.requires_grad_(False), classes, acc
