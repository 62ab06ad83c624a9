"""PSNR/SSIM against an independent reference written here: BasicSR's method (cv2.filter2D with
cv2.getGaussianKernel(11, 1.5) on float64, valid region [5:-5, 5:-5]), the PSNR formula and
the BT.601 luma written out; plus a looser cross-check against pyiqa's own psnr/ssim."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from diffsr.errors import ConfigError
from diffsr.metrics import gaussian_kernel, psnr, rgb_to_y, ssim

PSNR_TOL = 1e-4  # dB
SSIM_TOL = 1e-5


# ---------------------------------------------------------------- independent reference


def ref_y(img: np.ndarray) -> np.ndarray:
    """Y of BT.601 YCbCr for RGB on 0-255 (the MATLAB rgb2ycbcr luma, not rounded)."""
    img = img.astype(np.float64)
    return img[..., 0] * 65.481 / 255.0 + img[..., 1] * 128.553 / 255.0 + img[..., 2] * 24.966 / 255.0 + 16.0


def ref_prepare(a, b, crop, y):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    if y and a.shape[2] == 3:
        a, b = ref_y(a)[..., None], ref_y(b)[..., None]
    return a, b


def ref_psnr(a, b, crop, y=True):
    a, b = ref_prepare(a, b, crop, y)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else 20.0 * math.log10(255.0) - 10.0 * math.log10(mse)


def ref_ssim_plane(x, z):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = cv2.getGaussianKernel(11, 1.5)
    w = np.outer(k, k.transpose())

    def f(img):
        return cv2.filter2D(img, -1, w)[5:-5, 5:-5]

    mu1, mu2 = f(x), f(z)
    s1 = f(x**2) - mu1**2
    s2 = f(z**2) - mu2**2
    s12 = f(x * z) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))
    return m.mean()


def ref_ssim(a, b, crop, y=True):
    a, b = ref_prepare(a, b, crop, y)
    return float(np.mean([ref_ssim_plane(a[..., i].copy(), b[..., i].copy()) for i in range(a.shape[2])]))


# ---------------------------------------------------------------- data


def smooth_image(rng, h, w, c):
    """A natural-ish image: smoothed noise plus a gradient, on 0-255."""
    base = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, c)).astype(np.float32)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)
    img = img + np.linspace(-20, 20, w, dtype=np.float32)[None, :, None]
    return np.clip(img, 0, 255).astype(np.float64)


@pytest.fixture
def rgb_pair():
    rng = np.random.default_rng(0)
    gt = np.round(smooth_image(rng, 53, 67, 3))
    pred = np.clip(np.round(gt + rng.normal(0, 6, gt.shape)), 0, 255)
    return pred, gt


# ---------------------------------------------------------------- tests


def test_kernel_matches_cv2():
    np.testing.assert_allclose(
        gaussian_kernel(11, 1.5), cv2.getGaussianKernel(11, 1.5)[:, 0], rtol=0, atol=1e-15
    )


def test_y_matches_reference():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (7, 9, 3))
    np.testing.assert_allclose(rgb_to_y(img), ref_y(img), rtol=0, atol=1e-10)
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.full((1, 1, 3), 255.0))[0, 0] == pytest.approx(235.0)


@pytest.mark.parametrize("crop", [0, 4, 7])
@pytest.mark.parametrize("y", [True, False])
def test_rgb_pair(rgb_pair, crop, y):
    pred, gt = rgb_pair
    assert psnr(pred, gt, crop_border=crop, test_y_channel=y) == pytest.approx(
        ref_psnr(pred, gt, crop, y), abs=PSNR_TOL
    )
    assert ssim(pred, gt, crop_border=crop, test_y_channel=y) == pytest.approx(
        ref_ssim(pred, gt, crop, y), abs=SSIM_TOL
    )


def test_random_uniform_pair_float_inputs():
    """Unrounded float inputs (no quantisation anywhere) and an odd size."""
    rng = np.random.default_rng(2)
    gt = rng.uniform(0, 255, (31, 45, 3))
    pred = rng.uniform(0, 255, (31, 45, 3))
    assert psnr(pred, gt, 4) == pytest.approx(ref_psnr(pred, gt, 4), abs=PSNR_TOL)
    assert ssim(pred, gt, 4) == pytest.approx(ref_ssim(pred, gt, 4), abs=SSIM_TOL)
    assert ssim(pred.astype(np.float32), gt.astype(np.float32), 4) == pytest.approx(
        ref_ssim(pred.astype(np.float32), gt.astype(np.float32), 4), abs=SSIM_TOL
    )


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 1)])
def test_grayscale_single_channel(shape):
    rng = np.random.default_rng(3)
    gt = np.round(smooth_image(rng, 40, 50, 1)).reshape(shape)
    pred = np.clip(gt + rng.normal(0, 4, gt.shape), 0, 255)
    for y in (True, False):  # no Y conversion for one channel: same either way
        assert psnr(pred, gt, 4, y) == pytest.approx(ref_psnr(pred, gt, 4, False), abs=PSNR_TOL)
        assert ssim(pred, gt, 4, y) == pytest.approx(ref_ssim(pred, gt, 4, False), abs=SSIM_TOL)


def test_identical_images(rgb_pair):
    _, gt = rgb_pair
    assert psnr(gt, gt.copy()) == math.inf
    assert ssim(gt, gt.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(gt, gt.copy(), 0, False) == pytest.approx(1.0, abs=1e-12)


def test_sixteen_bit_inputs(tmp_path):
    """16-bit files: x / 65535 * 255, not rounded to 8 bits; read through diffsr.io."""
    from diffsr.io import read_image
    from diffsr.metrics.evaluate import _to_255

    rng = np.random.default_rng(4)
    gt16 = np.clip(smooth_image(rng, 36, 44, 3) * 257 + rng.integers(0, 257, (36, 44, 3)), 0, 65535)
    gt16 = gt16.astype(np.uint16)
    pred16 = np.clip(gt16.astype(np.int64) + rng.integers(-300, 301, gt16.shape), 0, 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "gt.png"), gt16[..., ::-1])  # cv2 writes BGR
    cv2.imwrite(str(tmp_path / "pred.png"), pred16[..., ::-1])
    gt_img, pred_img = read_image(tmp_path / "gt.png"), read_image(tmp_path / "pred.png")
    assert gt_img.bit_depth == 16
    a, b = _to_255(pred_img), _to_255(gt_img)
    np.testing.assert_array_equal(b, gt16.astype(np.float64) / 65535.0 * 255.0)
    ref_a, ref_b = pred16 / 65535.0 * 255.0, gt16 / 65535.0 * 255.0
    assert psnr(a, b, 4) == pytest.approx(ref_psnr(ref_a, ref_b, 4), abs=PSNR_TOL)
    assert ssim(a, b, 4) == pytest.approx(ref_ssim(ref_a, ref_b, 4), abs=SSIM_TOL)
    # rounding to 8 bits would change the result measurably: the 16-bit path is really used
    assert abs(psnr(a, b, 4) - ref_psnr(np.round(ref_a), np.round(ref_b), 4)) > 1e-3


def test_errors():
    a = np.zeros((20, 20, 3))
    with pytest.raises(ConfigError, match="shapes differ"):
        psnr(a, np.zeros((20, 21, 3)))
    with pytest.raises(ConfigError, match=r"\(H, W, 3\)"):
        ssim(np.zeros((20, 20, 4)), np.zeros((20, 20, 4)))
    with pytest.raises(ConfigError, match="nothing left"):
        psnr(a, a, crop_border=10)
    with pytest.raises(ConfigError, match="11x11"):
        ssim(a, a, crop_border=5)
    with pytest.raises(ConfigError, match="crop_border"):
        psnr(a, a, crop_border=-1)


def test_agrees_with_pyiqa(rgb_pair):
    """pyiqa's own psnr/ssim need no weights. They differ on purpose in details, so the
    tolerance is looser: float32 arithmetic and an eps of 1e-8 in the PSNR MSE, and for SSIM the
    Y channel rounded to integers plus a ReLU on the contrast-structure map."""
    pyiqa = pytest.importorskip("pyiqa")
    torch = pytest.importorskip("torch")
    pred, gt = rgb_pair

    def t(x):
        return torch.from_numpy((x / 255.0).transpose(2, 0, 1).copy()).float()[None]

    p = pyiqa.create_metric("psnr", device="cpu", test_y_channel=True, crop_border=4, color_space="ycbcr")
    s = pyiqa.create_metric("ssim", device="cpu", test_y_channel=True, crop_border=4, color_space="ycbcr")
    assert float(p(t(pred), t(gt))) == pytest.approx(psnr(pred, gt, 4), abs=2e-3)
    assert float(s(t(pred), t(gt))) == pytest.approx(ssim(pred, gt, 4), abs=2e-3)
    s_rgb = pyiqa.create_metric("ssimc", device="cpu", crop_border=4)
    p_rgb = pyiqa.create_metric("psnr", device="cpu", test_y_channel=False, crop_border=4)
    assert float(p_rgb(t(pred), t(gt))) == pytest.approx(psnr(pred, gt, 4, False), abs=2e-3)
    assert float(s_rgb(t(pred), t(gt))) == pytest.approx(ssim(pred, gt, 4, False), abs=2e-3)
