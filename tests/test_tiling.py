"""Latent tiling (Gaussian blending) and the tiled VAE with whole-image GroupNorm statistics."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from diffsr.latents import gaussian_weights, tile_starts, tiled_predict, vae_decode, vae_encode
from diffsr.synthetic import random_sd_parts
from diffsr.vae_tiling import plan_tiles


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
    tiles = plan_tiles(100, 250, 64)
    cover = torch.zeros(100, 250, dtype=torch.int64)
    for y0, y1, x0, x1 in tiles:
        cover[y0:y1, x0:x1] += 1
        assert y1 - y0 <= 64 and x1 - x0 <= 64
    assert torch.equal(cover, torch.ones_like(cover))
    assert len(tiles) == 2 * 4


@pytest.fixture(scope="module")
def tiny_vae():
    return random_sd_parts("tiny", seed=0, text_encoder=False).vae


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_tiled_vae_equals_untiled(tiny_vae, offload):
    """Layer-by-layer tiles with whole-image GroupNorm statistics and exact convolution context: the
    untiled result up to float rounding, at any tile size (odd sizes included), for every offload."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 200, 264, generator=g) * 2 - 1
    z_ref = vae_encode(tiny_vae, x, tile=10_000)
    for tile in (48, 72):
        z = vae_encode(tiny_vae, x, tile=tile, offload=offload)
        assert z.shape == z_ref.shape == (2, 4, 25, 33)
        torch.testing.assert_close(z, z_ref, atol=2e-6, rtol=1e-5)
    y_ref = vae_decode(tiny_vae, z_ref, tile=10_000)
    for tile in (7, 16):
        y = vae_decode(tiny_vae, z_ref, tile=tile, offload=offload)
        assert y.shape == y_ref.shape == (2, 3, 200, 264)
        torch.testing.assert_close(y, y_ref, atol=5e-5, rtol=0)
    assert torch.equal(vae_decode(tiny_vae, z_ref, tile=33), y_ref)  # one tile: the untiled forward


def test_tiled_vae_with_sd_shapes_equals_untiled():
    """The SD 2.1 VAE's structure (4 levels, 32 groups, 512-channel mid-block attention), small widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=16,
                        latent_channels=4).eval()  # fmt: skip
    z = torch.randn(1, 4, 20, 28)
    y_ref = vae_decode(vae, z, tile=10_000)
    torch.testing.assert_close(vae_decode(vae, z, tile=9, offload="disk"), y_ref, atol=5e-5, rtol=0)
    x = y_ref[..., :152, :216]
    torch.testing.assert_close(
        vae_encode(vae, x, tile=64), vae_encode(vae, x, tile=10_000), atol=2e-5, rtol=1e-4
    )


def test_per_tile_statistics_would_disagree(tiny_vae):
    """What whole-image statistics buy: normalising each tile by its own statistics is far off."""
    from diffsr import vae_tiling

    z = torch.randn(1, 4, 24, 32) * torch.linspace(0.2, 3, 32)  # statistics vary across the image
    ref = vae_decode(tiny_vae, z, tile=10_000)
    torch.testing.assert_close(vae_decode(tiny_vae, z, tile=8), ref, atol=5e-5, rtol=0)
    left = vae_tiling.tiled_forward(
        tiny_vae.decoder, tiny_vae.post_quant_conv(z[..., :16] / tiny_vae.config.scaling_factor), tile=10_000
    )
    assert (left.clamp(-1, 1) - ref[..., :128]).abs().max() > 0.05


def test_failure_mid_decode_leaves_no_files_or_threads(tiny_vae, tmp_path, monkeypatch):
    """An exception (or Ctrl-C) in the middle of a tiled decode unwinds: no thread, no temporary file."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = {"n": 0}
    conv = tiny_vae.decoder.up_blocks[1].resnets[0].conv2

    def boom(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    h = conv.register_forward_hook(boom)
    before = threading.active_count()
    try:
        with pytest.raises(KeyboardInterrupt):
            vae_decode(tiny_vae, torch.randn(1, 4, 24, 32), tile=8, offload="disk")
    finally:
        h.remove()
    assert threading.active_count() == before
    assert list(tmp_path.iterdir()) == []  # unlinked files: nothing to clean up
    z = torch.randn(1, 4, 24, 32)
    torch.testing.assert_close(
        vae_decode(tiny_vae, z, tile=8), vae_decode(tiny_vae, z, tile=10_000), atol=5e-5, rtol=0
    )


def test_one_vae_two_threads(tiny_vae):
    """The VAE is not modified by a tiled call, so threads can share it."""
    zs = [torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    seq = [vae_decode(tiny_vae, z, tile=8) for z in zs]
    out: dict[int, torch.Tensor] = {}

    def work(i):
        for _ in range(2):
            out[i] = vae_decode(tiny_vae, zs[i], tile=8)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(out[i], seq[i])


def test_bad_offload_is_refused(tiny_vae):
    from diffsr.errors import ConfigError

    with pytest.raises(ConfigError, match="offload"):
        vae_decode(tiny_vae, torch.randn(1, 4, 24, 32), tile=8, offload="gpu")
