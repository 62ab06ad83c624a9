"""Runs only where real weights exist: DIFFSR_PISA_BASE (SD 2.1-base folder) and DIFFSR_PISA_WEIGHTS."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.real_weights


@pytest.mark.skipif(
    not (os.environ.get("DIFFSR_PISA_BASE") and os.environ.get("DIFFSR_PISA_WEIGHTS")),
    reason="set DIFFSR_PISA_BASE and DIFFSR_PISA_WEIGHTS to run against the real PiSA-SR weights",
)
def test_pisa_real_weights_sensible():
    from PIL import Image

    import diffsr

    up = diffsr.load("pisa")
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.stack([128 + 60 * np.sin(xx / 6), 128 + 60 * np.cos(yy / 5), np.full_like(xx, 100.0)], -1)
    lr = Image.fromarray(img.astype(np.uint8))
    out = np.asarray(up.upscale(lr)).astype(np.float64)
    ref = np.asarray(lr.resize((384, 384), Image.Resampling.BICUBIC)).astype(np.float64)
    assert out.shape == (384, 384, 3)
    psnr = 10 * np.log10(255**2 / np.mean((out - ref) ** 2))
    assert psnr > 20, psnr  # a trained SR model keeps the content of a smooth image


@pytest.mark.skipif(
    not (
        os.environ.get("DIFFSR_S3DIFF_BASE")
        and os.environ.get("DIFFSR_S3DIFF_WEIGHTS")
        and os.environ.get("DIFFSR_DE_NET")
    ),
    reason="set DIFFSR_S3DIFF_BASE, DIFFSR_S3DIFF_WEIGHTS and DIFFSR_DE_NET to run against the real S3Diff weights",
)
def test_s3diff_real_weights_sensible():
    from PIL import Image

    import diffsr

    up = diffsr.load("s3diff")
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.stack([128 + 60 * np.sin(xx / 6), 128 + 60 * np.cos(yy / 5), np.full_like(xx, 100.0)], -1)
    lr = Image.fromarray(img.astype(np.uint8))
    out, info = up.upscale(lr, return_info=True)
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(lr.resize((384, 384), Image.Resampling.BICUBIC)).astype(np.float64)
    assert 0 < info["estimated"]["blur"] < 1 and 0 < info["estimated"]["noise"] < 1
    assert 10 * np.log10(255**2 / np.mean((out - ref) ** 2)) > 20
