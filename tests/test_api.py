"""The Python API: image kinds in and out, alpha, grayscale, bit depth, output scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.api import Upscaler, load
from diffsr.errors import ConfigError, ImageError
from diffsr.io import ImageData


@pytest.fixture
def up(pisa):
    return Upscaler(pisa)


def test_load_from_folders(tiny_sd_dir, pisa_dir):
    u = load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu", dtype="fp32")
    assert (u.method, u.scale) == ("pisa", 4)
    out = u.upscale(Image.new("RGB", (20, 24), (120, 30, 200)))
    assert out.size == (80, 96) and out.mode == "RGB"


def test_load_refuses_fp16_on_cpu_and_unknown_method(tiny_sd_dir, pisa_dir):
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu", dtype="fp16")
    with pytest.raises(ConfigError, match="unknown method"):
        load("esrgan")


def test_bf16_on_cpu_runs(tiny_sd_dir, pisa_dir):
    u = load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu", dtype="bf16")
    out = u.upscale(np.full((16, 16, 3), 128, np.uint8))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_pil_rgba_keeps_alpha(up):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 100
    rgba[:, 15:, 3] = 255  # right half opaque, left transparent
    out = up.upscale(Image.fromarray(rgba))
    assert out.mode == "RGBA" and out.size == (120, 80)
    a = np.asarray(out)[..., 3]
    assert a[:, :50].max() == 0 and a[:, 70:].min() == 255  # alpha upscaled on its own


def test_gray_stays_gray_16bit_stays_16bit(up):
    g16 = (np.random.default_rng(0).random((20, 20)) * 65535).astype(np.uint16)
    out = up.upscale(g16)
    assert out.shape == (80, 80) and out.dtype == np.uint16
    out = up.upscale(Image.fromarray(g16))
    assert out.mode == "I;16" and out.size == (80, 80)
    out = up.upscale(Image.new("L", (10, 12), 90))
    assert out.mode == "L" and out.size == (40, 48)


def test_numpy_float_and_tensors(up):
    f = np.random.default_rng(1).random((12, 10, 3)).astype(np.float32)
    out = up.upscale(f)
    assert out.shape == (48, 40, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    t = torch.rand(3, 12, 10, dtype=torch.float64)
    out = up.upscale(t)
    assert out.shape == (3, 48, 40) and out.dtype == torch.float64
    b = torch.rand(2, 4, 8, 8)
    out = up.upscale(b)
    assert out.shape == (2, 4, 32, 32)
    with pytest.raises(ImageError, match="float"):
        up.upscale(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ImageError, match="unsupported image type"):
        up.upscale("image.png")


def test_outscale(up):
    out = up.upscale(Image.new("RGB", (20, 10)), outscale=2)
    assert out.size == (40, 20)
    out = up.upscale(Image.new("RGB", (20, 10)), outscale=3.5)
    assert out.size == (70, 35)
    with pytest.raises(ConfigError, match="outscale"):
        up.upscale(Image.new("RGB", (20, 10)), outscale=0)


def test_same_result_for_every_kind(up):
    a = (np.random.default_rng(2).random((16, 18, 3)) * 255).astype(np.uint8)
    from_np = up.upscale(a)
    from_pil = np.asarray(up.upscale(Image.fromarray(a)))
    assert np.array_equal(from_np, from_pil)
    from_t = up.upscale(torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    assert np.abs(from_t.permute(1, 2, 0).numpy() * 255 - from_np).max() <= 1


def test_adjustable_api_rerender(up):
    img = Image.fromarray((np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8))
    adj = up.adjustable(img)
    a = adj.render(0.5, 0.8)
    assert isinstance(a, Image.Image) and a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(up.upscale(img, lambda_pix=0.5, lambda_sem=0.8)))
    assert adj.render(1.0, 1.0, outscale=2).size == (32, 32)


def test_return_info(up):
    out, info = up.upscale(np.zeros((8, 8, 3), np.uint8), lambda_pix=0.3, return_info=True)
    assert out.shape == (32, 32, 3) and info == {"mode": "adjustable", "lambda_pix": 0.3, "lambda_sem": 1.0}
    outs, infos = up.upscale(torch.rand(2, 3, 8, 8), return_info=True)
    assert outs.shape == (2, 3, 32, 32) and len(infos) == 2


def test_unknown_option_is_an_error(up):
    with pytest.raises(ConfigError, match="unknown option"):
        up.upscale(np.zeros((8, 8, 3), np.uint8), lambda_x=1)


def test_process_imagedata(up):
    d = ImageData(np.full((8, 8, 3), 0.5, np.float32), None, 8)
    out, info = up.process(d)
    assert info["mode"] == "default"
    assert out.pixels.shape == (32, 32, 3) and out.bit_depth == 8


def test_s3diff_through_the_api(s3diff):
    up = Upscaler(s3diff)
    rgba = np.zeros((10, 14, 4), np.uint8)
    rgba[..., 3] = 200
    out, info = up.upscale(Image.fromarray(rgba), return_info=True, blur=0.2)
    assert out.mode == "RGBA" and out.size == (56, 40) and np.asarray(out)[..., 3].min() >= 199
    assert info["used"]["blur"] == 0.2 and 0 < info["estimated"]["noise"] < 1
    g = up.upscale(np.full((9, 7), 30000, np.uint16))
    assert g.shape == (36, 28) and g.dtype == np.uint16
    with pytest.raises(ConfigError, match="no adjustable mode"):
        up.adjustable(np.zeros((8, 8, 3), np.uint8))


def test_weights_are_owned_and_aligned_so_cpu_and_cpu_index_agree(tiny_sd_dir, pisa_dir):
    """Memory-mapped safetensors weights sit at file offsets; CPU kernels sum unaligned data in
    another order. Loaded weights are owned and 64-byte aligned, so "cpu" (no copy) and "cpu:0"
    (a copy, what accelerate hands each CPU process) compute the same bits."""
    a = load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu")
    b = load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu:0")
    for m in (a.model.unet, a.model.vae):
        assert all(p.data_ptr() % 64 == 0 for p in m.parameters())
    rng = np.random.default_rng(3)
    for _ in range(7):
        img = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(a.upscale(img)), np.asarray(b.upscale(img)))
