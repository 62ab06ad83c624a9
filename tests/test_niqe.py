"""NIQE (`diffsr.metrics.niqe`): each stage against an independent computation, the whole score
against pyiqa's implementation and against MATLAB on BasicSR's baboon image, parameter files,
and NIQE inside `diffsr eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsr.cli import main
from diffsr.errors import ConfigError
from diffsr.metrics import evaluate
from diffsr.metrics import niqe as nq

DATA = Path(__file__).parent / "data"
MATLAB_BABOON = 5.72957338  # MATLAB R2021a, niqe_release, as BasicSR's calculate_niqe docstring reports it


def synthetic_params(seed: int = 0) -> nq.NiqeParams:
    """A valid pristine model (36-vector, symmetric positive-definite 36x36), not the authors'."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(36, 36))
    return nq.NiqeParams(rng.normal(1.0, 0.5, 36), a @ a.T / 36 + np.eye(36) * 0.1, "synthetic")


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An 8-bit-valued RGB image with smooth structure and noise (0-255 float64)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 7.0 + seed) * np.cos(y / 11.0) + rng.normal(0, 12, (h, w))
    rgb = np.stack([base, base * 0.8 + 30, 255 - base], axis=-1) + rng.normal(0, 4, (h, w, 3))
    return np.clip(np.round(rgb), 0, 255)


@pytest.fixture
def params_file(tmp_path, monkeypatch):
    p = synthetic_params()
    path = tmp_path / "niqe_pris_params.npz"
    np.savez(path, mu_pris_param=p.mu[None], cov_pris_param=p.cov, gaussian_window=np.ones((7, 7)))
    monkeypatch.setenv(nq.NIQE_PARAMS_ENV, str(path))
    return path


# ------------------------------------------------------------------ stages


@pytest.mark.parametrize("shape", [(96, 96), (40, 52), (192, 288)])
def test_imresize_half_equals_pillow_bicubic_on_mirrored_borders(shape):
    """MATLAB's antialiased bicubic at 1/2 is Pillow's (a = -0.5, support 4) on the image mirrored
    by 4 pixels, with the 2 outputs that come from the padding dropped on each side."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    a = rng.random(shape) * 255
    ours = nq.imresize_matlab(a, 0.5)
    assert ours.shape == (shape[0] // 2, shape[1] // 2)
    padded = np.pad(a, 4, mode="symmetric")
    t = torch.from_numpy(padded)[None, None]
    ref = F.interpolate(t, size=(padded.shape[0] // 2, padded.shape[1] // 2), mode="bicubic", antialias=True)
    ref = ref[0, 0, 2:-2, 2:-2].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_imresize_odd_size_rounds_up():
    out = nq.imresize_matlab(np.ones((97, 45)) * 7.0, 0.5)
    assert out.shape == (49, 23)
    np.testing.assert_allclose(out, 7.0, atol=1e-12)  # weights sum to one everywhere


def test_mscn_equals_scipy_correlate_with_replicated_borders():
    from scipy.ndimage import correlate

    a = np.random.default_rng(2).random((30, 41)) * 255
    x, y = np.mgrid[-3:4, -3:4]
    win = np.exp(-(x * x + y * y) / (2 * (7 / 6) ** 2))
    win /= win.sum()
    mu = correlate(a, win, mode="nearest")
    sigma = np.sqrt(np.abs(correlate(a * a, win, mode="nearest") - mu * mu))
    np.testing.assert_allclose(nq._mscn(a), (a - mu) / (sigma + 1), atol=1e-10)


def _aggd_scalar(v: np.ndarray) -> tuple[float, float, float]:
    """The release's estimateaggdparam.m, one vector at a time."""
    from scipy.special import gamma

    gam = np.arange(0.2, 10.0 + 1e-9, 0.001)
    r_gam = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
    left = math.sqrt(np.mean(v[v < 0] ** 2))
    right = math.sqrt(np.mean(v[v > 0] ** 2))
    g = left / right
    rhat = np.mean(np.abs(v)) ** 2 / np.mean(v**2)
    rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - rnorm) ** 2)]
    k = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * k, right * k


def test_aggd_fit_equals_scalar_restatement():
    rng = np.random.default_rng(3)
    rows = np.stack([rng.standard_t(df, 2000) * s for df, s in [(2, 1.0), (5, 0.3), (30, 2.0)]])
    rows[1] = np.where(rows[1] > 0, rows[1] * 2.5, rows[1])  # asymmetric
    alpha, bl, br = nq._aggd(rows)
    for i, row in enumerate(rows):
        a, left, right = _aggd_scalar(row)
        assert alpha[i] == pytest.approx(a, abs=1e-12)
        assert (bl[i], br[i]) == pytest.approx((left, right), rel=1e-12)


def test_aggd_without_negatives_gives_nan_scales():
    alpha, bl, br = nq._aggd(np.abs(np.random.default_rng(4).normal(size=(1, 100))) + 0.1)
    assert alpha[0] == pytest.approx(0.2) and math.isnan(bl[0]) and not math.isnan(br[0])


# ------------------------------------------------------------------ whole score


def test_niqe_agrees_with_pyiqa_implementation():
    """pyiqa's torch implementation of the same release (independent code), same model."""
    pytest.importorskip("pyiqa")
    import torch
    from pyiqa.archs.niqe_arch import calculate_niqe

    p = synthetic_params(1)
    for seed, (h, w) in enumerate([(96, 96), (200, 300)]):
        g = textured(h, w, seed)[..., 0]
        ref = calculate_niqe(torch.from_numpy(g / 255)[None, None], 0, True, "yiq",
                             torch.from_numpy(p.mu), torch.from_numpy(p.cov)).item()  # fmt: skip
        assert nq.niqe_gray(g, p) == pytest.approx(ref, rel=1e-3)


def test_niqe_matches_matlab_on_baboon():
    try:
        params = nq.find_niqe_params()
    except ConfigError as e:
        pytest.skip(f"the release's pristine model is not installed: {e}")
    img = np.asarray(Image.open(DATA / "baboon.png").convert("RGB"), dtype=np.float64)
    assert nq.niqe(img, params) == pytest.approx(MATLAB_BABOON, abs=1e-3)


def test_color_spaces_and_gray():
    p = synthetic_params(2)
    img = textured(100, 130, 5)
    y = np.round(16 + (65.481 * img[..., 0] + 128.553 * img[..., 1] + 24.966 * img[..., 2]) / 255)
    yiq = np.round(0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])
    assert nq.niqe(img, p) == nq.niqe_gray(y, p)
    assert nq.niqe(img, p, color_space="yiq") == nq.niqe_gray(yiq, p)
    assert nq.niqe(y[..., None], p) == nq.niqe_gray(y, p)  # one channel: used as it is
    assert nq.niqe(img, p, crop_border=2) == nq.niqe_gray(y[2:-2, 2:-2], p)
    with pytest.raises(ConfigError, match="at least 96x96"):
        nq.niqe(img[:95], p)
    with pytest.raises(ConfigError, match="color_space"):
        nq.niqe(img, p, color_space="lab")


# ------------------------------------------------------------------ parameter files


def test_params_npz_and_mat_load_alike(tmp_path):
    from scipy.io import savemat

    p = synthetic_params(3)
    np.savez(tmp_path / "a.npz", mu_pris_param=p.mu[None], cov_pris_param=p.cov)
    savemat(tmp_path / "b.mat", {"mu_prisparam": p.mu[None], "cov_prisparam": p.cov})
    for name in ("a.npz", "b.mat"):
        q = nq.load_niqe_params(tmp_path / name)
        np.testing.assert_array_equal(q.mu, p.mu)
        np.testing.assert_array_equal(q.cov, p.cov)
        assert q.source == str(tmp_path / name)


def test_params_errors_are_one_line_naming_the_file(tmp_path):
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(36))
    np.savez(tmp_path / "shape.npz", mu_pris_param=np.zeros(18), cov_pris_param=np.eye(18))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, what in [("wrong.npz", "no 'mu_pris_param'"), ("shape.npz", "36-vector"),
                       ("junk.npz", "cannot read"), ("absent.npz", "not found")]:  # fmt: skip
        with pytest.raises(ConfigError) as e:
            nq.load_niqe_params(tmp_path / name)
        msg = str(e.value)
        assert what in msg and str(tmp_path / name) in msg and "\n" not in msg


def test_find_params_order_and_missing(tmp_path, monkeypatch):
    p = synthetic_params(4)
    env_file = tmp_path / "env.npz"
    np.savez(env_file, mu_pris_param=p.mu, cov_pris_param=p.cov)
    monkeypatch.setenv(nq.NIQE_PARAMS_ENV, str(env_file))
    assert nq.find_niqe_params().source == str(env_file)  # before any installed package
    monkeypatch.setenv(nq.NIQE_PARAMS_ENV, str(tmp_path / "gone.npz"))
    with pytest.raises(ConfigError, match="gone.npz: NIQE parameter file not found"):
        nq.find_niqe_params()
    monkeypatch.delenv(nq.NIQE_PARAMS_ENV)
    monkeypatch.setattr(nq, "_candidates", lambda: [])
    with pytest.raises(ConfigError, match=nq.NIQE_PARAMS_ENV) as e:
        nq.find_niqe_params()
    assert "--niqe-params" not in str(e.value)  # the library names no diffsr CLI flag


def test_pyiqa_cache_location_is_a_candidate(tmp_path, monkeypatch):
    monkeypatch.delenv(nq.NIQE_PARAMS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert tmp_path / "hub" / "pyiqa" / "niqe_modelparameters.mat" in nq._candidates()


# ------------------------------------------------------------------ in diffsr eval


def test_eval_niqe_follows_convention(tmp_path, params_file, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    imgs = {f"{i}": textured(100, 120 + 8 * i, 10 + i).astype(np.uint8) for i in range(2)}
    for k, a in imgs.items():
        Image.fromarray(a).save(pred / f"{k}.png")
    Image.fromarray(imgs["0"][:50, :50]).save(pred / "small.png")
    p = nq.load_niqe_params(params_file)
    r = evaluate(pred, None, "niqe")
    assert r.settings["niqe"] == {"color_space": "ycbcr", "params": str(params_file)}
    assert dict(r.rows)["0"]["niqe"] == nq.niqe(imgs["0"].astype(np.float64), p)
    assert list(r.failed) == ["small"] and "at least 96x96" in r.failed["small"]
    r2 = evaluate(pred, None, "niqe", convention="pyiqa", niqe_params=p)
    assert dict(r2.rows)["1"]["niqe"] == nq.niqe(imgs["1"].astype(np.float64), p, color_space="yiq")
    assert "niqe (Y of YIQ, as pyiqa) ↓" in r2.markdown()

    (pred / "small.png").unlink()
    rc = main(["eval", "--pred", str(pred), "--metrics", "niqe", "-q", "-o", str(tmp_path / "o"),
               "--niqe-params", str(params_file)])  # fmt: skip
    assert rc == 0
    assert "| niqe (Y of YCbCr, as MATLAB) ↓ |" in capsys.readouterr().out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["mean"]["niqe"] == pytest.approx(np.mean([v["niqe"] for _, v in r.rows]))


def test_eval_niqe_without_params_is_unavailable(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(nq.NIQE_PARAMS_ENV, raising=False)
    monkeypatch.setattr(nq, "_candidates", lambda: [])
    pred = tmp_path / "pred"
    pred.mkdir()
    Image.fromarray(textured(96, 96).astype(np.uint8)).save(pred / "a.png")
    assert main(["eval", "--pred", str(pred), "--metrics", "niqe", "-q"]) == 1
    assert "niqe: unavailable: NIQE needs the pristine model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not found"):  # a file named by the caller must exist
        evaluate(pred, None, "niqe", niqe_params=tmp_path / "none.npz")
