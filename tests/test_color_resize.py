"""Colour fixes against NumPy references; Pillow-kernel resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.color import color_fix
from diffsr.errors import ConfigError
from diffsr.resize import pil_resize


def np_adain(x, ref, eps=1e-5):
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        xm, xs = x[c].mean(), np.sqrt(x[c].var(ddof=1) + eps)
        rm, rs = ref[c].mean(), np.sqrt(ref[c].var(ddof=1) + eps)
        out[c] = (x[c] - xm) / xs * rs + rm
    return out


def np_blur(img, d):
    k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16
    p = np.pad(img, ((0, 0), (d, d), (d, d)), mode="edge")
    h, w = img.shape[1:]
    out = np.zeros_like(img)
    for i in range(3):
        for j in range(3):
            out += k[i, j] * p[:, i * d : i * d + h, j * d : j * d + w]
    return out


def np_wavelet(x, ref, levels=5):
    def low(img):
        for i in range(levels):
            img = np_blur(img, 2**i)
        return img

    return (x - low(x)) + low(ref)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.random((3, 40, 52)) * 0.6 + 0.3
    ref = rng.random((3, 40, 52)) * 0.3
    return x, ref


def _t(a):
    return torch.from_numpy(a)[None].double()


def test_adain_matches_numpy(pair):
    x, ref = pair
    got = color_fix(_t(x), _t(ref), "adain")[0].numpy()
    np.testing.assert_allclose(got, np.clip(np_adain(x, ref), 0, 1), atol=1e-10)


def test_wavelet_matches_numpy(pair):
    x, ref = pair
    got = color_fix(_t(x), _t(ref), "wavelet")[0].numpy()
    np.testing.assert_allclose(got, np.clip(np_wavelet(x, ref), 0, 1), atol=1e-10)


def test_wavelet_takes_reference_colour():
    rng = np.random.default_rng(1)
    texture = rng.random((3, 64, 64)) * 0.1
    x = texture + np.array([0.8, 0.1, 0.1])[:, None, None]  # reddish output
    ref = np.full((3, 64, 64), 0.4)  # grey reference
    got = color_fix(_t(x), _t(ref), "wavelet")[0].numpy()
    assert np.abs(got.mean(axis=(1, 2)) - 0.4).max() < 0.01
    assert got.std() > 0.02  # texture (high frequencies) kept


def test_none_only_clamps_and_bad_mode(pair):
    x, ref = pair
    torch.testing.assert_close(color_fix(_t(x) * 2, _t(ref), "none"), (_t(x) * 2).clamp(0, 1))
    with pytest.raises(ConfigError, match="color_fix"):
        color_fix(_t(x), _t(ref), "hist")


@pytest.mark.parametrize(
    "method,flt", [("bicubic", Image.Resampling.BICUBIC), ("lanczos", Image.Resampling.LANCZOS)]
)
def test_pil_resize_matches_pillow_8bit(method, flt):
    yy, xx = np.mgrid[0:30, 0:44]
    a = (127 + 100 * np.sin(xx / 5) * np.cos(yy / 7)).astype(
        np.uint8
    )  # smooth: no clipping in Pillow's 8-bit path
    rgb = np.stack([a, a[::-1], a[:, ::-1]], -1)
    ref = np.asarray(Image.fromarray(rgb).resize((101, 67), flt)).astype(np.float32)
    got = pil_resize(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), (67, 101), method)[0].permute(
        1, 2, 0
    )
    assert np.abs(got.numpy().round() - ref).max() <= 1


def test_pil_resize_keeps_dtype_device_and_rejects_bad_method():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    y = pil_resize(x, (16, 12), "bicubic")
    assert y.shape == (2, 3, 16, 12) and y.dtype == torch.float64
    with pytest.raises(ConfigError):
        pil_resize(x, (4, 4), "cubic")


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(151, 207), (20, 30), (37, 212)])
def test_device_resize_equals_pillow_float(method, size):
    """Bicubic/bilinear run with torch's antialiased kernels on the tensor's device: they must be
    Pillow's kernels (computed here independently with Pillow's float 'F' resampler)."""
    x = (
        torch.rand(1, 2, 37, 53, generator=torch.Generator().manual_seed(0)) * 3 - 1
    )  # beyond [0, 1]: no clipping
    flt = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[method]
    ref = np.stack([np.asarray(Image.fromarray(x[0, c].numpy()).resize(size[::-1], flt)) for c in range(2)])
    got = pil_resize(x, size, method)[0].numpy()
    assert np.abs(got - ref).max() < 2e-5
