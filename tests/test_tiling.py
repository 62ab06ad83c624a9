"""Latent tiling (Gaussian blending) and the tiled VAE with whole-image GroupNorm statistics."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from diffsr.latents import gaussian_weights, tile_starts, tiled_predict, vae_decode, vae_encode
from diffsr.synthetic import random_sd_parts
from diffsr.vae_tiling import plan_tiles, tiled_forward


def authors_grid(size, tile, overlap):
    """The offsets of the authors' tiling loop (PiSA-SR _predict_with_tiling), restated."""
    n, cur = 0, 0
    while cur < size:
        cur = max(n * tile - overlap * n, 0) + tile
        n += 1
    return [max(i * tile - overlap * i, 0) if i < n - 1 else size - tile for i in range(n)]


@pytest.mark.parametrize("size", [97, 128, 160, 161, 250, 400])
def test_tile_starts_match_authors_grid(size):
    assert tile_starts(size, 96, 64) == authors_grid(size, 96, 32)


def test_gaussian_weights_formula():
    w = gaussian_weights(96, 40)
    y, x = 10, 3
    expect = math.exp(-((y - 47.5) ** 2) / (2 * 9.6**2)) * math.exp(-((x - 19.5) ** 2) / (2 * 4.0**2))
    assert w.shape == (96, 40)
    assert w[y, x].item() == pytest.approx(expect, rel=1e-5)
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))


def test_tiled_predict_identity_is_exact_and_batched():
    z = torch.randn(1, 4, 150, 230)
    shapes = []

    def fn(t):
        shapes.append(tuple(t.shape))
        return t * 1.0

    out = tiled_predict(fn, z, tile=96, overlap=32, batch_size=4)
    torch.testing.assert_close(out, z)
    n_tiles = len(tile_starts(150, 96, 64)) * len(tile_starts(230, 96, 64))
    assert sum(s[0] for s in shapes) == n_tiles and max(s[0] for s in shapes) == 4
    assert all(s[1:] == (4, 96, 96) for s in shapes)


def test_one_tile_covering_calls_fn_once_unchanged():
    z = torch.randn(1, 4, 64, 80)
    fn = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(tiled_predict(fn, z, tile=96, overlap=32), fn(z), atol=0, rtol=0)


def test_long_thin_latent_gets_rectangular_tiles():
    z = torch.randn(1, 4, 20, 700)
    shapes = []

    def fn(t):
        shapes.append(tuple(t.shape[-2:]))
        return t + 1

    out = tiled_predict(fn, z, tile=96, overlap=32, batch_size=2)
    assert set(shapes) == {(20, 96)}
    torch.testing.assert_close(out, z + 1)


def test_tiled_close_to_untiled_for_local_operator():
    torch.manual_seed(0)
    fn = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    z = torch.randn(1, 4, 120, 200)
    with torch.no_grad():
        ref = fn(z)
        out = tiled_predict(fn, z, tile=64, overlap=16, batch_size=3)
    err = (out - ref).abs()
    assert err.mean() < 0.02 * ref.abs().mean()
    assert err[..., 10:-10, 10:-10].median() < 1e-6  # exact away from tile borders


def test_adjustable_channels_blend_linearly():
    """Blending [ε_pix, ε_pix+sem] then combining equals combining per tile then blending (Eq. 8 per tile)."""
    torch.manual_seed(1)
    f1, f2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    z = torch.randn(1, 4, 130, 170)
    lp, ls = 0.6, 1.3
    with torch.no_grad():
        pair = tiled_predict(lambda t: torch.cat([f1(t), f2(t)], 1), z)
        direct = tiled_predict(lambda t: lp * f1(t) + ls * (f2(t) - f1(t)), z)
    torch.testing.assert_close(
        lp * pair[:, :4] + ls * (pair[:, 4:] - pair[:, :4]), direct, atol=1e-5, rtol=1e-5
    )


def test_plan_tiles_cover_image_once():
    tiles = plan_tiles(100, 250, 64, 8, align=8)
    cover = torch.zeros(100, 250, dtype=torch.int64)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert all(v % 8 == 0 or v in (100, 250) for v in t.core)
        by0, by1, bx0, bx1 = t.box
        assert by0 <= y0 and by1 >= y1 and bx0 <= x0 and bx1 >= x1
    assert torch.equal(cover, torch.ones_like(cover))


class _NormOnly(nn.Module):
    """GroupNorms and pointwise ops only: tiling must then be exact, so GroupNorm statistics are global."""

    def __init__(self):
        super().__init__()
        self.n1 = nn.GroupNorm(2, 4)
        self.n2 = nn.GroupNorm(4, 4, affine=False)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        with torch.no_grad():
            self.n1.weight.uniform_(0.5, 2)
            self.n1.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.n2(torch.nn.functional.silu(self.n1(self.up(x))) * 3 + 1)


def test_shared_group_norm_statistics_are_whole_image():
    torch.manual_seed(0)
    m = _NormOnly()
    x = torch.randn(2, 4, 40, 56) * torch.linspace(0.1, 5, 56)  # strongly varying statistics across the image
    with torch.no_grad():
        ref = m(x)
        out = tiled_forward(m, x, tile=16, pad=3, scale=2)
        naive = torch.cat([m(x[..., :, :28]), m(x[..., :, 28:])], dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (naive - ref).abs().max() > 0.1  # per-tile statistics would disagree


def test_tiled_vae_close_to_untiled():
    parts = random_sd_parts("tiny", seed=0, text_encoder=False)
    x = torch.rand(1, 3, 192, 256) * 2 - 1
    z_ref = vae_encode(parts.vae, x, tile=10_000)
    err32 = (vae_encode(parts.vae, x, tile=64, pad=32) - z_ref).abs().mean()
    err64 = (vae_encode(parts.vae, x, tile=64, pad=64) - z_ref).abs().mean()
    assert err32 < 0.1 * z_ref.abs().mean()  # random weights: a wider receptive field than a trained VAE's
    assert err64 < 0.5 * err32  # more context, closer
    y_ref = vae_decode(parts.vae, z_ref, tile=10_000)
    y_tiled = vae_decode(parts.vae, z_ref, tile=10, pad=11)
    assert y_tiled.shape == y_ref.shape == (1, 3, 192, 256)
    err11 = (y_tiled - y_ref).abs().mean()
    assert err11 < 0.01  # in [-1, 1]: under one 8-bit level on average, even with random weights
    assert (vae_decode(parts.vae, z_ref, tile=10, pad=4) - y_ref).abs().mean() > 3 * err11
    torch.testing.assert_close(
        vae_decode(parts.vae, z_ref, tile=32), y_ref, atol=0, rtol=0
    )  # one tile: untiled


def test_tile_error_propagates_without_hanging():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = nn.GroupNorm(1, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("tile exploded")
            return self.n(x)

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="tile exploded"):
        tiled_forward(Boom(), torch.randn(1, 2, 32, 32), tile=8, pad=2, scale=1)
    assert threading.active_count() == before
