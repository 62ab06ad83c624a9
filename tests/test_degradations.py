"""Tests for diffsr.degradations (Real-ESRGAN second-order degradation model)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffsr.degradations as D
from diffsr.degradations import (
    PRESETS,
    DegradationConfig,
    Degrader,
    KernelConfig,
    add_gaussian_noise,
    add_poisson_noise,
    bessel_j1,
    crop_to_multiple,
    degrade,
    gaussian_kernel,
    generalized_gaussian_kernel,
    get_preset,
    jpeg_compress,
    jpeg_quality_tables,
    kernel_from_params,
    plateau_kernel,
    sample_kernel,
    sample_params,
    sinc_kernel,
    upsample_to_hr,
)
from diffsr.errors import ConfigError

# ------------------------------------------------------------------------------------------- #
# fixtures / helpers
# ------------------------------------------------------------------------------------------- #


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 0.5 + 0.35 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    g = 0.5 + 0.3 * np.cos((xx + yy) / 17.0)
    b = 0.4 + 0.3 * np.sin(yy / 7.0 + 1.0)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def _textured_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def _to_tensor(im: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1)[None].float() / 255.0


def _pil_jpeg(im: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).astype(np.float64) / 255.0


@pytest.fixture(scope="module")
def hr_batch() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    return F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------- #
# Bessel J1
# ------------------------------------------------------------------------------------------- #


def test_bessel_j1_matches_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.concatenate(
        [np.linspace(-120.0, 120.0, 24001), [0.0, 1e-9, 1e-3, 49.999, 50.0, 50.001, 300.0, 1e4]]
    )
    ours = bessel_j1(torch.from_numpy(x)).numpy()
    assert ours.dtype == np.float64
    assert np.abs(ours - special.j1(x)).max() < 1e-7


def test_bessel_j1_known_values_without_scipy():
    # J1(0) = 0, J1'(0) = 1/2, J1 odd, first positive zero j_{1,1} = 3.8317059702075125
    assert bessel_j1(0.0).item() == 0.0
    assert bessel_j1(1e-6).item() == pytest.approx(0.5e-6, rel=1e-9)
    assert abs(bessel_j1(3.8317059702075125).item()) < 1e-12
    x = torch.linspace(0.1, 80.0, 500, dtype=torch.float64)
    assert torch.allclose(bessel_j1(-x), -bessel_j1(x), atol=0, rtol=0)
    # shape preserved
    assert bessel_j1(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


# ------------------------------------------------------------------------------------------- #
# kernels
# ------------------------------------------------------------------------------------------- #

_KERNEL_CASES = [
    {"type": "iso", "size": 21, "sigma_x": 2.0, "sigma_y": 2.0, "rotation": 0.0},
    {"type": "aniso", "size": 15, "sigma_x": 2.5, "sigma_y": 0.8, "rotation": 0.7},
    {"type": "generalized_iso", "size": 13, "sigma_x": 1.5, "sigma_y": 1.5, "rotation": 0.0, "beta": 0.6},
    {"type": "generalized_aniso", "size": 21, "sigma_x": 3.0, "sigma_y": 1.0, "rotation": -2.0, "beta": 3.5},
    {"type": "plateau_iso", "size": 9, "sigma_x": 1.2, "sigma_y": 1.2, "rotation": 0.0, "beta": 1.7},
    {"type": "plateau_aniso", "size": 11, "sigma_x": 0.5, "sigma_y": 2.0, "rotation": 2.5, "beta": 1.2},
    {"type": "sinc", "size": 17, "omega_c": 1.1},
    {"type": "identity", "size": 1},
]


@pytest.mark.parametrize("params", _KERNEL_CASES, ids=lambda p: p["type"])
def test_every_kernel_type_sums_to_one_and_pads(params):
    k = kernel_from_params(params)
    assert k.dtype == torch.float32
    assert k.shape == (params["size"], params["size"])
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
    padded = kernel_from_params(params, pad_to=21)
    assert padded.shape == (21, 21)
    p = (21 - params["size"]) // 2
    assert torch.equal(padded[p : p + params["size"], p : p + params["size"]], k)
    assert padded.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert padded.abs().sum().item() == pytest.approx(k.abs().sum().item(), abs=1e-6)  # only zeros added
    # the centre is the (joint) maximum for every type
    assert padded[10, 10].item() == pytest.approx(padded.max().item())


@pytest.mark.parametrize(
    "make",
    [
        lambda: gaussian_kernel(21, 2.3),
        lambda: generalized_gaussian_kernel(17, 1.7, beta=0.7),
        lambda: plateau_kernel(13, 1.4, beta=1.8),
        lambda: sinc_kernel(21, 0.9),
    ],
    ids=["gaussian", "generalized", "plateau", "sinc"],
)
def test_isotropic_kernels_are_fully_symmetric(make):
    k = make()
    assert torch.allclose(k, k.flip(0), atol=1e-8)
    assert torch.allclose(k, k.flip(1), atol=1e-8)
    assert torch.allclose(k, k.T, atol=1e-8)


def test_anisotropic_gaussian_orientation():
    k = gaussian_kernel(21, 3.0, 1.0, 0.0)
    # rotation 0: mirror symmetric about both axes, but not about the diagonal
    assert torch.allclose(k, k.flip(0), atol=1e-8)
    assert torch.allclose(k, k.flip(1), atol=1e-8)
    assert not torch.allclose(k, k.T, atol=1e-4)
    # sigma_x is the spread along columns (x): variance along x > along y
    ax = torch.arange(21, dtype=torch.float32) - 10
    var_x = (k.sum(0) * ax**2).sum().item()
    var_y = (k.sum(1) * ax**2).sum().item()
    assert var_x == pytest.approx(9.0, rel=0.02) and var_y == pytest.approx(1.0, rel=0.02)
    # rotating by pi/2 swaps the axes
    assert torch.allclose(
        gaussian_kernel(21, 3.0, 1.0, math.pi / 2), gaussian_kernel(21, 1.0, 3.0, 0.0), atol=1e-7
    )
    # rotation by pi is the same ellipse
    assert torch.allclose(
        gaussian_kernel(15, 2.0, 0.7, 0.4), gaussian_kernel(15, 2.0, 0.7, 0.4 + math.pi), atol=1e-7
    )
    # a rotated aniso kernel is point symmetric (k(-p) = k(p)) but not mirror symmetric
    kr = gaussian_kernel(15, 2.5, 0.8, 0.6)
    assert torch.allclose(kr, kr.flip(0, 1), atol=1e-8)
    assert not torch.allclose(kr, kr.flip(0), atol=1e-4)


def test_generalized_gaussian_beta_one_is_gaussian_and_formula():
    # Real-ESRGAN's parameterisation exp(-0.5 * q**beta): beta = 1 is the Gaussian
    for sx, sy, rot in [(2.0, None, 0.0), (2.5, 1.1, 0.9)]:
        g = gaussian_kernel(21, sx, sy, rot)
        gg = generalized_gaussian_kernel(21, sx, sy, rot, beta=1.0)
        assert torch.allclose(g, gg, atol=1e-8)
    # beta = 2 follows exp(-0.5 * (r^2 / s^2)^2) up to normalisation
    k = generalized_gaussian_kernel(21, 3.0, beta=2.0).double()
    r2 = torch.tensor([1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    expected = torch.exp(-0.5 * (r2 / 9.0) ** 2)
    got = torch.stack([k[10, 11], k[10, 12], k[10, 13], k[10, 14]]) / k[10, 10]
    assert torch.allclose(got, expected, rtol=1e-5)
    # larger beta -> flatter top, lighter tails
    sharp, flat = (
        generalized_gaussian_kernel(21, 3.0, beta=0.5),
        generalized_gaussian_kernel(21, 3.0, beta=4.0),
    )
    assert (flat[10, 12] / flat[10, 10]) > (sharp[10, 12] / sharp[10, 10])
    assert (flat[10, 20] / flat[10, 10]) < (sharp[10, 20] / sharp[10, 10])


def test_plateau_kernel_shape():
    sigma = 2.0
    for beta in (1.0, 1.5, 2.0):
        k = plateau_kernel(21, sigma, beta=beta).double()
        for r in (1, 2, 4, 7, 10):
            expected = 1.0 / (1.0 + (r * r / sigma**2) ** beta)
            assert (k[10, 10 + r] / k[10, 10]).item() == pytest.approx(expected, rel=1e-5)
    # plateau: flatter top than the Gaussian of the same sigma, and heavier tails
    p, g = plateau_kernel(21, 3.0, beta=3.0), gaussian_kernel(21, 3.0)
    assert (p[10, 11] / p[10, 10]).item() > 0.998 > 0.95 > (g[10, 11] / g[10, 10]).item()
    assert (
        plateau_kernel(21, 1.0, beta=1.0)[10, 20] / plateau_kernel(21, 1.0, beta=1.0)[10, 10]
    ).item() > 1e-3
    assert (gaussian_kernel(21, 1.0)[10, 20] / gaussian_kernel(21, 1.0)[10, 10]).item() < 1e-20


def test_sinc_kernel_centre_and_frequency_response():
    # unnormalised centre is omega^2 / (4 pi); the ratio to a neighbour follows the jinc formula
    w = 1.3
    k = sinc_kernel(21, w).double()
    centre = w * w / (4 * math.pi)
    neighbour = w * bessel_j1(torch.tensor(w)).item() / (2 * math.pi)
    assert (k[10, 11] / k[10, 10]).item() == pytest.approx(neighbour / centre, rel=1e-6)

    n = 256
    freqs = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    wy, wx = torch.meshgrid(freqs, freqs, indexing="ij")
    radius = torch.sqrt(wx**2 + wy**2)
    for omega in (math.pi / 2, math.pi / 3, math.pi / 4):
        resp = torch.fft.fft2(sinc_kernel(21, omega).double(), s=(n, n)).abs()
        inside = radius < 0.7 * omega
        outside = (radius > 1.3 * omega) & (radius < math.pi)
        assert (resp[inside] - 1).abs().mean().item() < 0.1
        assert (resp[inside] - 1).abs().max().item() < 0.25
        assert resp[outside].mean().item() < 0.03
        assert resp[outside].max().item() < 0.15
    # pad_to keeps the kernel centred
    padded = sinc_kernel(7, 2.0, pad_to=21)
    assert padded.shape == (21, 21) and torch.equal(padded[7:14, 7:14], sinc_kernel(7, 2.0))


def test_kernel_argument_errors():
    with pytest.raises(ConfigError, match="size"):
        gaussian_kernel(20, 1.0)
    with pytest.raises(ConfigError, match="sigma_x"):
        gaussian_kernel(21, 0.0)
    with pytest.raises(ConfigError, match="beta"):
        plateau_kernel(21, 1.0, beta=-1.0)
    with pytest.raises(ConfigError, match="omega_c"):
        sinc_kernel(21, 4.0)
    with pytest.raises(ConfigError, match="type"):
        kernel_from_params({"type": "box", "size": 3})
    with pytest.raises(ConfigError, match="sigma_y"):
        kernel_from_params({"type": "aniso", "size": 7, "sigma_x": 1.0, "rotation": 0.0})
    with pytest.raises(ConfigError, match="pad size"):
        kernel_from_params({"type": "sinc", "size": 21, "omega_c": 1.0}, pad_to=11)


def test_sample_kernel_records_what_it_drew():
    cfg = KernelConfig()
    g = _gen(5)
    seen_types, seen_sizes = Counter(), Counter()
    for _ in range(300):
        k, params = sample_kernel(cfg, g)
        json.dumps(params)
        assert k.shape == (21, 21) and k.dtype == torch.float32
        assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.equal(k, kernel_from_params(params, pad_to=21))
        size = params["size"]
        assert size in range(7, 22, 2)
        if size < 21:  # zero-padded outside the drawn support
            p = (21 - size) // 2
            assert k[:p].abs().sum() == 0 and k[:, -p:].abs().sum() == 0
        kind = params["type"]
        seen_types[kind] += 1
        seen_sizes[size] += 1
        if kind == "sinc":
            lo = math.pi / 3 if size < 13 else math.pi / 5
            assert lo <= params["omega_c"] <= math.pi
        else:
            assert 0.2 <= params["sigma_x"] <= 3.0 and 0.2 <= params["sigma_y"] <= 3.0
            if kind.endswith("_iso") or kind == "iso":
                assert params["sigma_x"] == params["sigma_y"] and params["rotation"] == 0.0
            else:
                assert -math.pi <= params["rotation"] <= math.pi
            if kind.startswith("generalized"):
                assert 0.5 <= params["beta"] <= 4.0
            if kind.startswith("plateau"):
                assert 1.0 <= params["beta"] <= 2.0
    assert set(seen_sizes) == set(range(7, 22, 2))
    assert seen_types["iso"] > seen_types["aniso"] > seen_types["generalized_aniso"]
    assert 10 <= seen_types["sinc"] <= 55  # sinc_prob 0.1 of 300


def test_sample_kernel_respects_max_size_and_sinc_cutoff_ranges():
    small = KernelConfig(kernel_size=11, sinc_prob=1.0)
    big = KernelConfig(kernel_size=21, sinc_prob=1.0)
    g = _gen(11)
    for _ in range(100):
        k, p = sample_kernel(small, g)
        assert k.shape == (11, 11) and p["size"] in (7, 9, 11)
        assert math.pi / 3 <= p["omega_c"] <= math.pi
    omegas = [sample_kernel(big, g)[1] for _ in range(200)]
    large = [p["omega_c"] for p in omegas if p["size"] >= 13]
    assert min(large) < math.pi / 3  # the wider [pi/5, pi] range is used for big kernels
    assert all(math.pi / 5 <= w <= math.pi for w in large)


# ------------------------------------------------------------------------------------------- #
# configuration
# ------------------------------------------------------------------------------------------- #


def test_presets_hold_the_published_values():
    assert set(PRESETS) == {"pisa", "s3diff"}
    pisa, s3 = get_preset("pisa"), get_preset("s3diff")
    for cfg in (pisa, s3):  # the shared degradation section (identical in both yml files)
        assert cfg.scale == 4
        assert cfg.resize_prob == (0.2, 0.7, 0.1) and cfg.resize_range == (0.3, 1.5)
        assert cfg.gaussian_noise_prob == 0.5 and cfg.noise_range == (1.0, 15.0)
        assert cfg.poisson_scale_range == (0.05, 2.0) and cfg.gray_noise_prob == 0.4
        assert cfg.jpeg_range == (60.0, 95.0)
        assert cfg.second_blur_prob == 0.5
        assert cfg.resize_prob2 == (0.3, 0.4, 0.3) and cfg.resize_range2 == (0.6, 1.2)
        assert cfg.gaussian_noise_prob2 == 0.5 and cfg.noise_range2 == (1.0, 12.0)
        assert cfg.poisson_scale_range2 == (0.05, 1.0) and cfg.gray_noise_prob2 == 0.4
        assert cfg.jpeg_range2 == (60.0, 100.0)
        assert cfg.final_sinc_prob == 0.8
        assert cfg.resize_modes == ("area", "bilinear", "bicubic")
        assert cfg.resize_mode_prob == pytest.approx((1 / 3, 1 / 3, 1 / 3))
        for k in (cfg.kernel1, cfg.kernel2):
            assert k.kernel_list == (
                "iso",
                "aniso",
                "generalized_iso",
                "generalized_aniso",
                "plateau_iso",
                "plateau_aniso",
            )
            assert k.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
            assert k.sinc_prob == 0.1
    assert (pisa.kernel1.kernel_size, pisa.kernel2.kernel_size) == (21, 21)
    assert pisa.kernel1.blur_sigma == (0.2, 3.0) and pisa.kernel2.blur_sigma == (0.2, 1.5)
    assert pisa.kernel1.betag_range == pisa.kernel2.betag_range == (0.5, 4.0)
    assert pisa.kernel1.betap_range == pisa.kernel2.betap_range == (1.0, 2.0)
    # S3Diff's yml says blur_kernel_size2: 11, but its dataset draws both sizes from a hard-coded 7..21
    assert (s3.kernel1.kernel_size, s3.kernel2.kernel_size) == (21, 21)
    assert pisa.round_output and not s3.round_output  # S3Diff's degradation_proc clamps, never rounds
    assert pisa.lr_upsample_modes == ("area", "bilinear", "bicubic") and s3.lr_upsample_modes == ("bicubic",)
    assert pisa.no_degradation_prob == 0.0 and s3.no_degradation_prob == 0.01
    assert s3.kernel1.blur_sigma == (0.2, 1.5) and s3.kernel2.blur_sigma == (0.2, 1.0)
    assert s3.kernel1.betag_range == s3.kernel2.betag_range == (0.5, 2.0)
    assert s3.kernel1.betap_range == s3.kernel2.betap_range == (1.0, 1.5)
    assert DegradationConfig() == pisa


_MIRRORS = Path("/work/.mirror")


def _git_show(repo: Path, path: str) -> str | None:
    if shutil.which("git") is None or not repo.exists():
        return None
    res = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def _kernel_from_yml(d: dict, sfx: str, size_key: str) -> dict:
    return {
        "kernel_size": d[size_key],
        "kernel_list": tuple(d["kernel_list" + sfx]),
        "kernel_prob": tuple(d["kernel_prob" + sfx]),
        "sinc_prob": d["sinc_prob" + sfx],
        "blur_sigma": tuple(float(v) for v in d["blur_sigma" + sfx]),
        "betag_range": tuple(float(v) for v in d["betag_range" + sfx]),
        "betap_range": tuple(float(v) for v in d["betap_range" + sfx]),
    }


_DEG_KEYS = [
    "resize_prob", "resize_range", "gaussian_noise_prob", "noise_range", "poisson_scale_range", "gray_noise_prob",
    "jpeg_range", "second_blur_prob", "resize_prob2", "resize_range2", "gaussian_noise_prob2", "noise_range2",
    "poisson_scale_range2", "gray_noise_prob2", "jpeg_range2",
]  # fmt: skip


def _check_against_yml(cfg: DegradationConfig, deg: dict, kern: dict, size2: int | None = None) -> None:
    for key in _DEG_KEYS:
        want = deg[key]
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == pytest.approx(want), key
    for stage, sfx, size_key in (
        (cfg.kernel1, "", "blur_kernel_size"),
        (cfg.kernel2, "2", "blur_kernel_size2"),
    ):
        exp = _kernel_from_yml(kern, sfx, size_key)
        if size2 is not None and sfx == "2":
            exp["kernel_size"] = size2
        for name, value in exp.items():
            if name == "kernel_list":
                assert stage.kernel_list == value
            else:
                assert getattr(stage, name) == pytest.approx(value), name
    assert cfg.final_sinc_prob == kern["final_sinc_prob"]


def test_presets_match_the_authors_yml_files_when_mirrors_exist():
    yaml = pytest.importorskip("yaml")
    pisa_txt = _git_show(_MIRRORS / "csslc+PiSA-SR" / "repo", "src/datasets/params.yml")
    s3_txt = _git_show(_MIRRORS / "ArcticHare105+S3Diff" / "repo", "configs/sr.yaml")
    if pisa_txt is None or s3_txt is None:
        pytest.skip("reference mirrors not available")
    pisa = yaml.safe_load(pisa_txt)
    _check_against_yml(get_preset("pisa"), pisa, pisa["kernel_info"])
    assert get_preset("pisa").scale == pisa["scale"]
    s3 = yaml.safe_load(s3_txt)
    _check_against_yml(get_preset("s3diff"), s3["degradation"], s3["train"], size2=21)
    assert get_preset("s3diff").no_degradation_prob == s3["degradation"]["no_degradation_prob"]
    assert get_preset("s3diff").scale == s3["sf"]


def test_get_preset_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as info:
        get_preset("realesrgan")
    msg = str(info.value)
    assert "pisa" in msg and "s3diff" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["pisa", "s3diff"])
def test_config_round_trips_through_json(name):
    cfg = get_preset(name)
    d = cfg.to_dict()
    text = json.dumps(d)
    back = DegradationConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_dict() == d
    assert isinstance(d["kernel1"], dict) and isinstance(d["resize_range"], list)
    assert KernelConfig.from_dict(cfg.kernel2.to_dict()) == cfg.kernel2


def test_config_accepts_lists_and_nested_dicts():
    cfg = DegradationConfig(noise_range=[2, 9], kernel2={"kernel_size": 9, "blur_sigma": [0.3, 0.9]})
    assert cfg.noise_range == (2.0, 9.0)
    assert cfg.kernel2 == KernelConfig(kernel_size=9, blur_sigma=(0.3, 0.9))
    assert hash(cfg) == hash(
        DegradationConfig(noise_range=(2.0, 9.0), kernel2=KernelConfig(kernel_size=9, blur_sigma=(0.3, 0.9)))
    )


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"scale": 0}, "scale"),
        ({"resize_prob": (0.5, 0.5, 0.5)}, "resize_prob"),
        ({"resize_prob2": (0.5, 0.5)}, "resize_prob2"),
        ({"resize_range": (1.5, 0.3)}, "resize_range"),
        ({"resize_range2": (1.1, 1.2)}, "resize_range2"),
        ({"gaussian_noise_prob": 1.5}, "gaussian_noise_prob"),
        ({"noise_range": (15, 1)}, "noise_range"),
        ({"noise_range2": (1, 300)}, "noise_range2"),
        ({"poisson_scale_range": (-1, 2)}, "poisson_scale_range"),
        ({"jpeg_range": (0, 95)}, "jpeg_range"),
        ({"jpeg_range2": (60, 101)}, "jpeg_range2"),
        ({"second_blur_prob": -0.1}, "second_blur_prob"),
        ({"final_sinc_prob": "high"}, "final_sinc_prob"),
        ({"final_sinc_kernel_size": 8}, "final_sinc_kernel_size"),
        ({"resize_modes": ("nearest",), "resize_mode_prob": (1.0,)}, "resize_modes"),
        ({"resize_mode_prob": (0.5, 0.5)}, "resize_mode_prob"),
        ({"round_output": 1}, "round_output"),
        ({"kernel1": {"kernel_size": 23}}, "kernel_size"),
        ({"kernel1": 5}, "kernel1"),
    ],
)
def test_degradation_config_validation(kwargs, field_name):
    with pytest.raises(ConfigError) as info:
        DegradationConfig(**kwargs)
    msg = str(info.value)
    assert field_name in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kwargs, field_name, allowed",
    [
        ({"kernel_size": 20}, "kernel_size", "[7, 21]"),
        ({"kernel_size": 5}, "kernel_size", "[7, 21]"),
        ({"kernel_size": 23}, "kernel_size", "[7, 21]"),
        ({"kernel_list": ("iso", "box"), "kernel_prob": (0.5, 0.5)}, "kernel_list", "iso"),
        ({"kernel_prob": (0.5, 0.5, 0.0, 0.0, 0.0, 0.1)}, "kernel_prob", "summing to 1"),
        ({"kernel_list": ("iso", "aniso")}, "kernel_prob", "summing to 1"),
        ({"sinc_prob": 2}, "sinc_prob", "[0, 1]"),
        ({"blur_sigma": (0.0, 1.0)}, "blur_sigma", "0.0 < low"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma", "low <= high"),
        ({"betag_range": (1.5, 4.0)}, "betag_range", "1.0"),
        ({"betap_range": (1.0,)}, "betap_range", "[low, high]"),
    ],
)
def test_kernel_config_validation(kwargs, field_name, allowed):
    with pytest.raises(ConfigError) as info:
        KernelConfig(**kwargs)
    msg = str(info.value)
    assert field_name in msg and allowed in msg and "\n" not in msg


def test_from_dict_rejects_unknown_keys():
    d = get_preset("pisa").to_dict()
    d["blur_sigma"] = [0.2, 3.0]  # belongs in kernel1, not at the top level
    with pytest.raises(ConfigError, match="blur_sigma"):
        DegradationConfig.from_dict(d)
    d = get_preset("pisa").to_dict()
    d["kernel2"]["sigma"] = 1.0
    with pytest.raises(ConfigError, match=r"kernel2.*sigma"):
        DegradationConfig.from_dict(d)
    with pytest.raises(ConfigError):
        DegradationConfig.from_dict([1, 2])
    assert issubclass(ConfigError, ValueError)


def test_configs_are_frozen():
    cfg = get_preset("pisa")
    with pytest.raises(AttributeError):
        cfg.scale = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- #
# noise
# ------------------------------------------------------------------------------------------- #


def test_gaussian_noise_statistics_and_gray():
    img = torch.full((1, 3, 128, 128), 0.5)
    sigma = 10.0
    out = add_gaussian_noise(img, sigma, gray=False, generator=_gen(0))
    res = out - img
    assert res.std().item() == pytest.approx(sigma / 255, rel=0.1)
    assert abs(res.mean().item()) < 0.1 * sigma / 255
    assert not torch.equal(res[:, 0], res[:, 1])
    gray = add_gaussian_noise(img, sigma, gray=True, generator=_gen(0)) - img
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert gray.std().item() == pytest.approx(sigma / 255, rel=0.1)
    # clipping to [0, 1]
    assert add_gaussian_noise(torch.ones(1, 3, 32, 32), 30.0, generator=_gen(1)).max().item() <= 1.0
    # per-sample sigma
    two = (
        add_gaussian_noise(torch.full((2, 3, 96, 96), 0.5), torch.tensor([2.0, 20.0]), generator=_gen(2))
        - 0.5
    )
    assert two[0].std().item() == pytest.approx(2 / 255, rel=0.1)
    assert two[1].std().item() == pytest.approx(20 / 255, rel=0.1)


def _poisson_test_image() -> torch.Tensor:
    img = torch.empty(1, 3, 96, 128)
    img[..., :48, :] = 0.15
    img[..., 48:, :] = 0.75
    img[..., :1, :] = torch.linspace(0, 1, 128)  # one ramp row: 128 levels -> vals = 128
    return img


def test_poisson_noise_variance_grows_with_intensity():
    img = _poisson_test_image()
    for gray in (False, True):
        res = add_poisson_noise(img, 1.0, gray=gray, generator=_gen(3), clip=False) - img
        dark, bright = res[..., 2:46, :], res[..., 50:, :]
        assert bright.var().item() > 2.5 * dark.var().item()
        # shot-noise variance ~ intensity / vals with vals = 2**ceil(log2(#levels))
        vals = 128 if not gray else 128
        assert dark.var().item() == pytest.approx(0.15 / vals, rel=0.2)
        assert bright.var().item() == pytest.approx(0.75 / vals, rel=0.2)
        if gray:
            assert torch.equal(res[:, 0], res[:, 1]) and torch.equal(res[:, 0], res[:, 2])
    # scale multiplies the noise
    a = add_poisson_noise(img, 0.5, generator=_gen(4), clip=False) - img
    b = add_poisson_noise(img, 1.0, generator=_gen(4), clip=False) - img
    assert torch.allclose(2 * a[..., 2:, :], b[..., 2:, :], atol=1e-6)


# ------------------------------------------------------------------------------------------- #
# JPEG
# ------------------------------------------------------------------------------------------- #


def test_jpeg_quality_tables():
    y50, c50 = jpeg_quality_tables(50)
    assert y50[0, 0, 0] == 16 and y50[0, 7, 7] == 99 and y50[0, 0, 1] == 11 and y50[0, 1, 0] == 12
    assert c50[0, 0, 0] == 17 and c50[0, 7, 7] == 99 and c50[0, 0, 3] == 47
    y100, c100 = jpeg_quality_tables(100)
    assert torch.all(y100 == 1) and torch.all(c100 == 1)
    y10, _ = jpeg_quality_tables(10)  # s = 500 -> 16*5 = 80, 99*5 = 495 -> clamped 255
    assert y10[0, 0, 0] == 80 and y10[0, 7, 7] == 255
    y75, _ = jpeg_quality_tables(75)  # s = 50 -> floor((16*50 + 50)/100) = 8
    assert y75[0, 0, 0] == 8 and y75[0, 0, 1] == 6
    assert jpeg_quality_tables([30, 90])[0].shape == (2, 8, 8)
    with pytest.raises(ConfigError, match="quality"):
        jpeg_quality_tables(0)


@pytest.mark.parametrize("quality", [95, 75, 50, 30])
def test_jpeg_matches_a_real_encoder_on_a_smooth_image(quality):
    im = _smooth_rgb(72, 88)  # not a multiple of 16: exercises the padding
    ours = jpeg_compress(_to_tensor(im), quality)[0].permute(1, 2, 0).numpy().astype(np.float64)
    ref = _pil_jpeg(im, quality)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 2 / 255
    # and our error w.r.t. the original is that of the real codec to within 20 %
    err_ours, err_ref = np.abs(ours - im / 255).mean(), np.abs(ref - im / 255).mean()
    assert err_ours == pytest.approx(err_ref, rel=0.2)


def test_jpeg_error_grows_as_quality_falls():
    im = _textured_rgb(64, 96)
    t = _to_tensor(im)
    qualities = [100, 90, 70, 50, 30, 10]
    errs = [(jpeg_compress(t, q) - t).abs().mean().item() for q in qualities]
    assert all(a < b for a, b in zip(errs, errs[1:], strict=False)), errs
    ref_errs = [np.abs(_pil_jpeg(im, q) - im / 255).mean() for q in qualities[1:]]
    for ours, ref in zip(errs[1:], ref_errs, strict=True):
        assert ours == pytest.approx(ref, rel=0.1)


def test_jpeg_batched_per_sample_quality_and_differentiable():
    im = _to_tensor(_textured_rgb(48, 48, seed=1))
    batch = torch.cat([im, im.flip(-1), im.flip(-2)])
    q = [90.0, 60.0, 25.0]
    out = jpeg_compress(batch, torch.tensor(q))
    for i in range(3):
        assert torch.equal(out[i : i + 1], jpeg_compress(batch[i : i + 1], q[i]))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 1
    x = batch.clone().requires_grad_(True)
    soft = jpeg_compress(x, q, differentiable=True)
    soft.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (soft.detach() - out).abs().mean().item() < 2 / 255


# ------------------------------------------------------------------------------------------- #
# sampling and the full pipeline
# ------------------------------------------------------------------------------------------- #


def test_sample_params_are_json_and_complete():
    cfg = get_preset("pisa")
    params = sample_params(cfg, 4, _gen(0))
    assert len(params) == 4
    assert json.loads(json.dumps(params)) == params
    for p in params:
        assert set(p) == set(D._PARAM_KEYS)
        assert isinstance(p["seed"], int) and 0 <= p["seed"] < 2**53
        assert p["resize1"]["mode"] in cfg.resize_modes and p["final_resize_mode"] in cfg.resize_modes
        assert p["final_order"] in ("resize_first", "jpeg_first")
        assert 60 <= p["jpeg1"]["quality"] <= 95 and 60 <= p["jpeg2"]["quality"] <= 100
        for key, rng in (("noise1", (1, 15)), ("noise2", (1, 12))):
            n = p[key]
            if n["type"] == "gaussian":
                assert rng[0] <= n["sigma"] <= rng[1]
            else:
                assert n["type"] == "poisson" and 0.05 <= n["scale"] <= 2.0
            assert isinstance(n["gray"], bool)


def test_sample_params_frequencies_follow_the_config():
    cfg = get_preset("pisa")
    params = sample_params(cfg, 1500, _gen(42))
    n = len(params)

    def frac(pred):
        return sum(1 for p in params if pred(p)) / n

    assert frac(lambda p: p["final_sinc"]["type"] == "sinc") == pytest.approx(0.8, abs=0.04)
    assert frac(lambda p: p["second_blur"]) == pytest.approx(0.5, abs=0.04)
    assert frac(lambda p: p["final_order"] == "resize_first") == pytest.approx(0.5, abs=0.04)
    assert frac(lambda p: p["noise1"]["type"] == "gaussian") == pytest.approx(0.5, abs=0.04)
    assert frac(lambda p: p["noise2"]["gray"]) == pytest.approx(0.4, abs=0.04)
    assert frac(lambda p: p["resize1"]["updown"] == "down") == pytest.approx(0.7, abs=0.04)
    assert frac(lambda p: p["resize2"]["updown"] == "keep") == pytest.approx(0.3, abs=0.04)
    for mode in ("area", "bilinear", "bicubic"):
        assert frac(lambda p, m=mode: p["resize1"]["mode"] == m) == pytest.approx(1 / 3, abs=0.04)
    for p in params:
        r1, r2 = p["resize1"], p["resize2"]
        assert {
            "up": 1.0 <= r1["scale"] <= 1.5,
            "down": 0.3 <= r1["scale"] <= 1.0,
            "keep": r1["scale"] == 1.0,
        }[r1["updown"]]
        assert {
            "up": 1.0 <= r2["scale"] <= 1.2,
            "down": 0.6 <= r2["scale"] <= 1.0,
            "keep": r2["scale"] == 1.0,
        }[r2["updown"]]
        if p["final_sinc"]["type"] == "sinc":
            assert math.pi / 3 <= p["final_sinc"]["omega_c"] <= math.pi


@pytest.mark.parametrize("name", ["pisa", "s3diff"])
def test_full_pipeline_shape_range_and_grid(name, hr_batch):
    cfg = get_preset(name)
    lr, params = Degrader(cfg)(hr_batch, _gen(7))
    assert lr.shape == (3, 3, 16, 16) and lr.dtype == torch.float32
    assert lr.min().item() >= 0.0 and lr.max().item() <= 1.0
    levels = lr * 255
    assert torch.equal(levels, levels.round()) == cfg.round_output  # S3Diff's LR stays unrounded
    assert len(params) == 3
    # non-square, several seeds, all code paths get exercised across draws
    hr = F.interpolate(hr_batch, size=(64, 48), mode="bilinear", align_corners=False)
    for seed in range(4):
        out = degrade(hr, sample_params(cfg, 3, _gen(100 + seed)), cfg)
        assert out.shape == (3, 3, 16, 12) and 0 <= out.min() and out.max() <= 1


def test_reproducibility(hr_batch):
    cfg = get_preset("pisa")
    deg = Degrader("pisa")
    lr_a, p_a = deg(hr_batch, _gen(123))
    lr_b, p_b = deg(hr_batch, _gen(123))
    assert p_a == p_b and torch.equal(lr_a, lr_b)
    assert sample_params(cfg, 3, _gen(123)) == p_a
    # params survive a JSON round trip and reproduce the output bitwise
    assert torch.equal(degrade(hr_batch, json.loads(json.dumps(p_a)), cfg), lr_a)
    lr_c, p_c = deg(hr_batch, _gen(124))
    assert p_c != p_a and not torch.equal(lr_c, lr_a)
    # only the noise seed changed -> a different output
    p_d = [dict(p, seed=p["seed"] + 1) for p in p_a]
    assert not torch.equal(degrade(hr_batch, p_d, cfg), lr_a)


@pytest.mark.parametrize("name", ["pisa", "s3diff"])
def test_batched_equals_per_sample(name, hr_batch):
    cfg = get_preset(name)
    for seed in (1, 2):
        params = sample_params(cfg, 3, _gen(seed))
        batched = degrade(hr_batch, params, cfg)
        singles = torch.cat([degrade(hr_batch[i : i + 1], [params[i]], cfg) for i in range(3)])
        assert torch.equal(batched, singles)


def test_stage_order_and_resize2_is_relative_to_the_original(monkeypatch, hr_batch):
    cfg = get_preset("pisa")
    p = sample_params(cfg, 1, _gen(0))[0]
    p.update(
        resize1={"updown": "up", "scale": 1.5, "mode": "bilinear"},
        resize2={"updown": "down", "scale": 0.75, "mode": "area"},
        final_order="jpeg_first",
        final_resize_mode="bicubic",
    )
    calls: list[tuple] = []
    orig_resize, orig_jpeg = D._resize, D.jpeg_compress

    def spy_resize(x, mode, **kw):
        out = orig_resize(x, mode, **kw)
        calls.append(("resize", mode, tuple(out.shape[-2:])))
        return out

    def spy_jpeg(x, q, differentiable=False):
        calls.append(("jpeg", tuple(x.shape[-2:]), round(float(q[0]), 6)))
        return orig_jpeg(x, q, differentiable)

    monkeypatch.setattr(D, "_resize", spy_resize)
    monkeypatch.setattr(D, "jpeg_compress", spy_jpeg)
    degrade(hr_batch[:1], [p], cfg)
    q1, q2 = round(p["jpeg1"]["quality"], 6), round(p["jpeg2"]["quality"], 6)
    assert calls == [
        ("resize", "bilinear", (96, 96)),  # 64 * 1.5
        ("jpeg", (96, 96), q1),
        ("resize", "area", (12, 12)),  # int(64 / 4 * 0.75), NOT 96 * 0.75
        ("jpeg", (12, 12), q2),  # jpeg_first
        ("resize", "bicubic", (16, 16)),
    ]
    calls.clear()
    p["final_order"] = "resize_first"
    degrade(hr_batch[:1], [p], cfg)
    assert [c[0] for c in calls] == ["resize", "jpeg", "resize", "resize", "jpeg"]
    assert calls[-1] == ("jpeg", (16, 16), q2)


def test_near_identity_config_approximates_area_downsampling():
    # tiny blur, no resize, no noise, JPEG at quality 100, no final sinc: LR ~ area-downscaled HR
    mild = KernelConfig(kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0, blur_sigma=(0.2, 0.2))
    cfg = DegradationConfig(
        resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1), gaussian_noise_prob=1, gaussian_noise_prob2=1,
        noise_range=(0, 0), noise_range2=(0, 0), jpeg_range=(100, 100), jpeg_range2=(100, 100),
        second_blur_prob=0, kernel1=mild, kernel2=mild, final_sinc_prob=0,
        resize_modes=("area",), resize_mode_prob=(1.0,),
    )  # fmt: skip
    # grey content: 4:2:0 chroma subsampling (applied at LR size by JPEG2) then loses nothing
    hr = _to_tensor(_smooth_rgb(64, 64)).mean(dim=1, keepdim=True).expand(1, 3, 64, 64).contiguous()
    lr, params = Degrader(cfg)(hr, _gen(0))
    assert params[0]["final_sinc"]["type"] == "identity" and not params[0]["second_blur"]
    expected = F.interpolate(hr, size=(16, 16), mode="area")
    assert (lr - expected).abs().mean().item() < 1 / 255
    assert (lr - expected).abs().max().item() < 3 / 255
    # round_output=False leaves the values off the 8-bit grid
    raw = degrade(hr, params, dataclasses.replace(cfg, round_output=False))
    assert not torch.equal(raw * 255, (raw * 255).round())
    assert (raw - lr).abs().max().item() <= 0.5 / 255 + 1e-6


def test_degrade_input_errors(hr_batch):
    cfg = get_preset("pisa")
    params = sample_params(cfg, 3, _gen(0))
    with pytest.raises(ConfigError, match="params"):
        degrade(hr_batch, params[:2], cfg)
    with pytest.raises(ConfigError, match="hr"):
        degrade(hr_batch[:, :1], params, cfg)
    with pytest.raises(ConfigError, match="hr"):
        degrade(torch.rand(1, 3, 3, 3), params[:1], cfg)
    broken = [dict(p) for p in params]
    del broken[1]["jpeg2"]
    with pytest.raises(ConfigError, match=r"params\[1\].*jpeg2"):
        degrade(hr_batch, broken, cfg)
    with pytest.raises(ConfigError, match="batch_size"):
        sample_params(cfg, 0, _gen(0))


# ------------------------------------------------------------------------------------------- #
# helpers
# ------------------------------------------------------------------------------------------- #


def test_upsample_to_hr():
    lr = torch.rand(2, 3, 8, 12)
    up = upsample_to_hr(lr, 4)
    assert up.shape == (2, 3, 32, 48)
    assert up.min().item() >= 0 and up.max().item() <= 1
    flat = torch.full((1, 3, 5, 5), 0.3)
    assert torch.allclose(upsample_to_hr(flat, 2), torch.full((1, 3, 10, 10), 0.3), atol=1e-6)
    with pytest.raises(ConfigError, match="scale"):
        upsample_to_hr(lr, 0)


def test_crop_to_multiple():
    t = torch.arange(2 * 3 * 37 * 50).reshape(2, 3, 37, 50)
    c = crop_to_multiple(t, 8)
    assert c.shape == (2, 3, 32, 48) and torch.equal(c, t[..., :32, :48])
    a = np.zeros((37, 50, 3))
    assert crop_to_multiple(a, 16).shape == (32, 48, 3)
    assert crop_to_multiple(np.zeros((37, 50)), 1).shape == (37, 50)
    with pytest.raises(ConfigError, match="m"):
        crop_to_multiple(t, 0)
    with pytest.raises(ConfigError):
        crop_to_multiple(t, 64)


def test_training_inputs_follow_the_authors_order_of_operations():
    """lr_up = clamp/round(interp_mode(unrounded LR)) with the mode drawn after the degradation
    parameters; PiSA rounds once at the HR size, S3Diff never; no-degradation swaps in the HR."""
    import dataclasses

    from diffsr.degradations import _resize, training_inputs

    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("pisa", "s3diff"):
        cfg = get_preset(name)
        lr, up = training_inputs(hr, cfg, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        params = sample_params(cfg, 2, g)
        raw = degrade(hr, params, dataclasses.replace(cfg, round_output=False))
        modes = cfg.lr_upsample_modes
        mode = modes[int(torch.randint(len(modes), (), generator=g).item())]
        want = torch.nn.functional.interpolate(
            raw, size=(32, 32), mode=mode, **({} if mode == "area" else {"align_corners": False})
        ).clamp(0, 1)
        if cfg.round_output:
            want, raw = (torch.round(t * 255) / 255 for t in (want, raw))
            assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit levels
        if torch.rand((), generator=g, dtype=torch.float64).item() < cfg.no_degradation_prob:
            want = hr
        assert lr.shape == (2, 3, 8, 8) and up.shape == (2, 3, 32, 32)
        torch.testing.assert_close(lr, raw, rtol=0, atol=0)
        torch.testing.assert_close(up, want, rtol=0, atol=1e-6)
        assert _resize(raw, "bicubic", size=(32, 32)).shape == up.shape
    assert not torch.equal(*(training_inputs(hr, get_preset("s3diff"), torch.Generator().manual_seed(s))[1]
                             for s in (5, 6)))  # fmt: skip
    always = dataclasses.replace(get_preset("s3diff"), no_degradation_prob=1.0)
    assert torch.equal(training_inputs(hr, always, torch.Generator().manual_seed(0))[1], hr)
    seen = {training_inputs(hr[:1, :, :16, :16], get_preset("pisa"), torch.Generator().manual_seed(s))[1].sum().item()
            for s in range(6)}  # fmt: skip
    assert len(seen) > 1
