"""Procedural texture images: labelled data for offline tests and a demo texture classifier.

PatchScaler's texture classifier is trained on DTD (PATCHSCALER.md D9), which cannot be reached
offline. These generators stand in for it: each kind draws its parameters (angle, frequency,
colours, phase, sharpness) from the caller's `torch.Generator`, so a given generator state always
gives the same images. Patterns are kept coarse enough (periods of 28 px or more) that they survive
an 8× downsampling, i.e. an SD-VAE latent of a 128×128 crop, or the avg-pool stand-in the tests use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import ConfigError

# our choice (PATCHSCALER.md D9): procedural classes stand in for DTD, which is not reachable offline
TEXTURE_KINDS = ("stripes", "checkers", "dots", "noise", "gradient", "rings")

_MIN_SIZE = 8


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """(n, 1, 1) uniform samples in [lo, hi): broadcasts against an (H, W) grid."""
    return (lo + (hi - lo) * torch.rand(n, generator=g)).view(n, 1, 1)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (size, size) each, origin at the top-left corner."""
    c = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(c, c, indexing="ij")


def _rotated(n: int, size: int, g: torch.Generator, max_angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid coordinates (n, size, size) rotated about the centre by a random angle in [0, max_angle)."""
    y, x = _grid(size)
    x, y = x - size / 2, y - size / 2
    a = _uniform(n, 0.0, max_angle, g)
    return x * a.cos() + y * a.sin(), -x * a.sin() + y * a.cos()


def _stripes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    u, _ = _rotated(n, size, g, math.pi)
    period = _uniform(n, 28.0, 64.0, g)
    phase = _uniform(n, 0.0, 2 * math.pi, g)
    sharp = _uniform(n, 0.5, 6.0, g)  # 0.5: nearly a sine; 6: nearly a square wave
    return 0.5 + 0.5 * torch.tanh(sharp * torch.sin(2 * math.pi * u / period + phase)) / torch.tanh(sharp)


def _checkers(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    u, v = _rotated(n, size, g, math.pi / 2)
    cell = _uniform(n, 24.0, 48.0, g)
    pu, pv = _uniform(n, 0.0, 1.0, g), _uniform(n, 0.0, 1.0, g)
    return torch.remainder(torch.floor(u / cell + pu) + torch.floor(v / cell + pv), 2.0)


def _dots(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    u, v = _rotated(n, size, g, math.pi / 2)
    spacing = _uniform(n, 32.0, 64.0, g)
    radius = spacing * _uniform(n, 0.18, 0.32, g)
    pu, pv = _uniform(n, 0.0, 1.0, g), _uniform(n, 0.0, 1.0, g)
    fu = torch.remainder(u / spacing + pu, 1.0) - 0.5
    fv = torch.remainder(v / spacing + pv, 1.0) - 0.5
    dist = torch.sqrt(fu.square() + fv.square()) * spacing  # pixels to the nearest lattice point
    return torch.sigmoid((radius - dist) / 1.2)


def _noise(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Two-octave value noise with a random cell size of 8–24 px, stretched to [0, 1]."""
    out = torch.empty(n, size, size)
    cells = torch.randint(max(2, size // 24), max(3, size // 8) + 1, (n,), generator=g)
    for i in range(n):
        c = int(cells[i])
        p = torch.zeros(1, 1, size, size)
        for octave, weight in ((c, 1.0), (2 * c, 0.5)):
            coarse = torch.rand(1, 1, octave, octave, generator=g)
            p += weight * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        p = p[0, 0]
        out[i] = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-6)
    return out


def _gradient(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    u, _ = _rotated(n, size, g, 2 * math.pi)
    half = size / math.sqrt(2.0)  # the largest |u| a rotated grid reaches
    gamma = torch.exp(_uniform(n, math.log(0.5), math.log(2.0), g))
    return ((u / half + 1.0) / 2.0).clamp(0.0, 1.0) ** gamma


def _rings(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    y, x = _grid(size)
    cx, cy = _uniform(n, 0.1 * size, 0.9 * size, g), _uniform(n, 0.1 * size, 0.9 * size, g)
    period = _uniform(n, 28.0, 56.0, g)
    phase = _uniform(n, 0.0, 2 * math.pi, g)
    r = torch.sqrt((x - cx).square() + (y - cy).square())
    return 0.5 + 0.5 * torch.sin(2 * math.pi * r / period + phase)


_PATTERNS = {
    "stripes": _stripes,
    "checkers": _checkers,
    "dots": _dots,
    "noise": _noise,
    "gradient": _gradient,
    "rings": _rings,
}
assert tuple(_PATTERNS) == TEXTURE_KINDS


def _colours(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two colours (n, 3, 1, 1) per image, one dark and one bright (random order), so every pattern
    has visible contrast."""
    dark = 0.45 * torch.rand(n, 3, generator=g)
    bright = 0.55 + 0.45 * torch.rand(n, 3, generator=g)
    swap = (torch.rand(n, 1, generator=g) < 0.5).float()
    c0 = swap * bright + (1 - swap) * dark
    c1 = swap * dark + (1 - swap) * bright
    return c0.view(n, 3, 1, 1), c1.view(n, 3, 1, 1)


def procedural_textures(kind: str, n: int, size: int = 128, *, generator: torch.Generator) -> torch.Tensor:
    """`n` random textures of one kind: (n, 3, size, size) float32 in [0, 1], on the CPU.

    kind: one of TEXTURE_KINDS. Each image gets its own pattern parameters and a dark/bright colour
    pair, plus faint Gaussian pixel noise (σ ≤ 0.02). Deterministic given the generator's state."""
    if kind not in _PATTERNS:
        raise ConfigError(
            f"procedural_textures: unknown kind {kind!r}; choose one of {', '.join(TEXTURE_KINDS)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"procedural_textures: n must be an int >= 0, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < _MIN_SIZE:
        raise ConfigError(f"procedural_textures: size must be an int >= {_MIN_SIZE}, got {size!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ConfigError("procedural_textures: pass generator=torch.Generator() (a CPU generator)")
    if n == 0:
        return torch.empty(0, 3, size, size)
    pattern = _PATTERNS[kind](n, size, generator).unsqueeze(1)  # (n, 1, size, size) in [0, 1]
    c0, c1 = _colours(n, generator)
    img = c0 + (c1 - c0) * pattern
    sigma = 0.02 * torch.rand(n, 1, 1, 1, generator=generator)
    img = img + sigma * torch.randn(img.shape, generator=generator)
    return img.clamp_(0.0, 1.0).contiguous()


def procedural_dataset(
    n_per_kind: int,
    size: int = 128,
    *,
    generator: torch.Generator,
    kinds: tuple[str, ...] | list[str] = TEXTURE_KINDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled set: images (len(kinds)·n_per_kind, 3, size, size) float32 in [0, 1] and labels
    (N,) int64, where label i means kinds[i]. Grouped by kind in the order of `kinds`, not shuffled."""
    kinds = tuple(kinds)
    if not kinds:
        raise ConfigError("procedural_dataset: kinds is empty")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"procedural_dataset: kinds has duplicates: {kinds}")
    images = [procedural_textures(kind, n_per_kind, size, generator=generator) for kind in kinds]
    labels = torch.arange(len(kinds)).repeat_interleave(n_per_kind)
    return torch.cat(images), labels
