"""Real-ESRGAN's second-order degradation model, batched in PyTorch.

The module synthesises low-resolution training inputs from high-resolution images the way
Real-ESRGAN (and, following it, PiSA-SR and S3Diff) does:

    blur1 -> random resize1 -> noise1 -> JPEG1
    -> [blur2, with probability second_blur_prob] -> resize2 -> noise2
    -> either (resize to H/scale + final sinc, then JPEG2) or (JPEG2, then resize + final sinc)
    -> clamp and round to 8-bit levels

Sampling and applying are separate.  :func:`sample_params` draws every random choice of every
sample into plain JSON-able dicts (kernels are stored as their parameters, noise as a seed), and
:func:`degrade` applies such a list to a batch deterministically: the same parameters give bitwise
the same output on CPU, and a sample's result does not depend on the other samples in its batch.

Everything here is pure torch (no scipy): the Bessel function J1 used by the circular low-pass
("sinc") kernel and the JPEG simulation are implemented in this file.

Conventions
-----------
* Images are float tensors ``(B, 3, H, W)`` with values in ``[0, 1]``, RGB.
* Gaussian-noise ``sigma`` is given on the 0..255 scale (as in the configs) and applied as
  ``sigma / 255``.
* Generalised-Gaussian and plateau kernels use Real-ESRGAN's parameterisation
  ``exp(-0.5 * q**beta)`` and ``1 / (1 + q**beta)`` with ``q = x^T Sigma^-1 x``, so ``beta = 1``
  is the ordinary Gaussian.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffsr.errors import ConfigError

__all__ = [
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "KernelConfig",
    "DegradationConfig",
    "PRESETS",
    "get_preset",
    "bessel_j1",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "sinc_kernel",
    "pad_kernel",
    "kernel_from_params",
    "sample_kernel",
    "filter2d",
    "add_gaussian_noise",
    "add_poisson_noise",
    "jpeg_quality_tables",
    "jpeg_compress",
    "sample_params",
    "degrade",
    "Degrader",
    "training_inputs",
    "upsample_to_hr",
    "crop_to_multiple",
]

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
_UPDOWN = ("up", "down", "keep")
_MIN_KERNEL = 7
_MAX_KERNEL = 21
_PROB_TOL = 1e-6


# --------------------------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------------------------- #


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _as_int(name: str, v: Any, lo: int, hi: int, *, odd: bool = False) -> int:
    what = "an odd integer" if odd else "an integer"
    if not _is_number(v) or not math.isfinite(float(v)) or float(v) != int(v):
        raise ConfigError(f"{name} must be {what} in [{lo}, {hi}], got {v!r}")
    iv = int(v)
    if not lo <= iv <= hi or (odd and iv % 2 == 0):
        raise ConfigError(f"{name} must be {what} in [{lo}, {hi}], got {v!r}")
    return iv


def _as_prob(name: str, v: Any) -> float:
    if not _is_number(v) or not 0.0 <= float(v) <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
    return float(v)


def _as_probs(name: str, v: Any, n: int | None = None, what: str = "") -> tuple[float, ...]:
    label = f" ({what})" if what else ""
    count = f"{n} " if n is not None else ""
    msg = f"{name} must be a list of {count}probabilities in [0, 1] summing to 1{label}, got {v!r}"
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ConfigError(msg)
    if (n is not None and len(v) != n) or len(v) == 0:
        raise ConfigError(msg)
    if not all(_is_number(p) and 0.0 <= float(p) <= 1.0 for p in v):
        raise ConfigError(msg)
    out = tuple(float(p) for p in v)
    if abs(sum(out) - 1.0) > _PROB_TOL:
        raise ConfigError(msg)
    return out


def _as_range(
    name: str,
    v: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    contains: float | None = None,
) -> tuple[float, float]:
    lower = f"{lo} < low" if lo_open else f"{lo} <= low"
    middle = f" <= {contains} <=" if contains is not None else " <="
    msg = f"{name} must be [low, high] with {lower}{middle} high <= {hi}, got {v!r}"
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise ConfigError(msg)
    a, b = v
    if not (_is_number(a) and _is_number(b)):
        raise ConfigError(msg)
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or b > hi:
        raise ConfigError(msg)
    if (lo_open and a <= lo) or (not lo_open and a < lo):
        raise ConfigError(msg)
    if contains is not None and not a <= contains <= b:
        raise ConfigError(msg)
    return (a, b)


def _as_names(name: str, v: Any, allowed: Sequence[str]) -> tuple[str, ...]:
    msg = f"{name} must be a non-empty list of distinct names from {list(allowed)}, got {v!r}"
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) == 0:
        raise ConfigError(msg)
    if not all(isinstance(s, str) and s in allowed for s in v) or len(set(v)) != len(v):
        raise ConfigError(msg)
    return tuple(v)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _check_keys(cls_name: str, data: Any, allowed: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls_name}.from_dict needs a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown {cls_name} key(s) {unknown}; allowed keys: {list(allowed)}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class KernelConfig:
    """Settings of one blur stage (Real-ESRGAN's ``kernel_info`` block for stage 1 or 2).

    ``kernel_size`` is the largest kernel; each sample draws its size uniformly from the odd
    sizes ``7..kernel_size`` and is zero-padded back to ``kernel_size`` so a batch stacks.
    """

    kernel_size: int = 21
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        _set(
            self, "kernel_size", _as_int("kernel_size", self.kernel_size, _MIN_KERNEL, _MAX_KERNEL, odd=True)
        )
        _set(self, "kernel_list", _as_names("kernel_list", self.kernel_list, KERNEL_TYPES))
        _set(
            self,
            "kernel_prob",
            _as_probs("kernel_prob", self.kernel_prob, len(self.kernel_list), "one per kernel_list entry"),
        )
        _set(self, "sinc_prob", _as_prob("sinc_prob", self.sinc_prob))
        _set(self, "blur_sigma", _as_range("blur_sigma", self.blur_sigma, 0.0, 20.0, lo_open=True))
        _set(
            self,
            "betag_range",
            _as_range("betag_range", self.betag_range, 0.0, 16.0, lo_open=True, contains=1.0),
        )
        _set(
            self,
            "betap_range",
            _as_range("betap_range", self.betap_range, 0.0, 16.0, lo_open=True, contains=1.0),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(cls.__name__, data, names)
        return cls(**dict(data))


def _as_kernel_config(name: str, v: Any) -> KernelConfig:
    if isinstance(v, KernelConfig):
        return v
    if isinstance(v, Mapping):
        try:
            return KernelConfig.from_dict(v)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    raise ConfigError(f"{name} must be a KernelConfig or a mapping of its fields, got {type(v).__name__}")


@dataclass(frozen=True)
class DegradationConfig:
    """Full second-order degradation settings.  Defaults are the "pisa" preset.

    ``resize_prob*`` are the (up, down, keep) probabilities; "up" draws a factor in
    ``[1, resize_range[1]]``, "down" in ``[resize_range[0], 1]``.  ``resize2`` is relative to the
    ORIGINAL size divided by ``scale``.  Noise is Gaussian with probability
    ``gaussian_noise_prob`` (sigma on the 0..255 scale), Poisson otherwise.
    ``final_resize_first_prob`` is the probability of [resize + sinc] then JPEG2 (else JPEG2
    first).  ``round_output`` rounds the result to 8-bit levels (Real-ESRGAN / PiSA-SR do this).

    Training inputs (:func:`training_inputs`) also use ``lr_upsample_modes`` — the interpolation
    that brings the LR back to the HR size as the model's input, one drawn uniformly per batch
    (PiSA-SR draws area/bilinear/bicubic; S3Diff uses bicubic) — and ``no_degradation_prob``, the
    chance that a batch's model input is the HR itself (S3Diff: 0.01, drawn per batch as there).
    """

    scale: int = 4
    # first degradation
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (60.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.5
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 12.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (60.0, 100.0)
    # kernels
    kernel1: KernelConfig = field(default_factory=KernelConfig)
    kernel2: KernelConfig = field(default_factory=lambda: KernelConfig(blur_sigma=(0.2, 1.5)))
    final_sinc_prob: float = 0.8
    final_sinc_kernel_size: int = 21
    # resampling and ordering
    resize_modes: tuple[str, ...] = RESIZE_MODES
    resize_mode_prob: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    final_resize_first_prob: float = 0.5
    round_output: bool = True
    # training inputs
    lr_upsample_modes: tuple[str, ...] = RESIZE_MODES
    no_degradation_prob: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "scale", _as_int("scale", self.scale, 1, 16))
        for sfx in ("", "2"):
            _set(
                self,
                f"resize_prob{sfx}",
                _as_probs(f"resize_prob{sfx}", getattr(self, f"resize_prob{sfx}"), 3, "up, down, keep"),
            )
            _set(
                self,
                f"resize_range{sfx}",
                _as_range(
                    f"resize_range{sfx}",
                    getattr(self, f"resize_range{sfx}"),
                    0.0,
                    8.0,
                    lo_open=True,
                    contains=1.0,
                ),
            )
            for p in ("gaussian_noise_prob", "gray_noise_prob"):
                _set(self, p + sfx, _as_prob(p + sfx, getattr(self, p + sfx)))
            _set(
                self,
                f"noise_range{sfx}",
                _as_range(f"noise_range{sfx}", getattr(self, f"noise_range{sfx}"), 0.0, 255.0),
            )
            _set(
                self,
                f"poisson_scale_range{sfx}",
                _as_range(f"poisson_scale_range{sfx}", getattr(self, f"poisson_scale_range{sfx}"), 0.0, 20.0),
            )
            _set(
                self,
                f"jpeg_range{sfx}",
                _as_range(f"jpeg_range{sfx}", getattr(self, f"jpeg_range{sfx}"), 1.0, 100.0),
            )
        _set(self, "second_blur_prob", _as_prob("second_blur_prob", self.second_blur_prob))
        _set(self, "kernel1", _as_kernel_config("kernel1", self.kernel1))
        _set(self, "kernel2", _as_kernel_config("kernel2", self.kernel2))
        _set(self, "final_sinc_prob", _as_prob("final_sinc_prob", self.final_sinc_prob))
        _set(
            self,
            "final_sinc_kernel_size",
            _as_int(
                "final_sinc_kernel_size", self.final_sinc_kernel_size, _MIN_KERNEL, _MAX_KERNEL, odd=True
            ),
        )
        _set(self, "resize_modes", _as_names("resize_modes", self.resize_modes, RESIZE_MODES))
        _set(
            self,
            "resize_mode_prob",
            _as_probs(
                "resize_mode_prob",
                self.resize_mode_prob,
                len(self.resize_modes),
                "one per resize_modes entry",
            ),
        )
        _set(
            self, "final_resize_first_prob", _as_prob("final_resize_first_prob", self.final_resize_first_prob)
        )
        if not isinstance(self.round_output, (bool, np.bool_)):
            raise ConfigError(f"round_output must be true or false, got {self.round_output!r}")
        _set(self, "round_output", bool(self.round_output))
        _set(self, "lr_upsample_modes", _as_names("lr_upsample_modes", self.lr_upsample_modes, RESIZE_MODES))
        _set(self, "no_degradation_prob", _as_prob("no_degradation_prob", self.no_degradation_prob))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; nested kernel configs become dicts, tuples become lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, KernelConfig) else _jsonable(v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DegradationConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise ConfigError."""
        names = [f.name for f in dataclasses.fields(cls)]
        _check_keys(cls.__name__, data, names)
        return cls(**dict(data))


_PISA = DegradationConfig(
    scale=4,
    resize_prob=(0.2, 0.7, 0.1),
    resize_range=(0.3, 1.5),
    gaussian_noise_prob=0.5,
    noise_range=(1, 15),
    poisson_scale_range=(0.05, 2.0),
    gray_noise_prob=0.4,
    jpeg_range=(60, 95),
    second_blur_prob=0.5,
    resize_prob2=(0.3, 0.4, 0.3),
    resize_range2=(0.6, 1.2),
    gaussian_noise_prob2=0.5,
    noise_range2=(1, 12),
    poisson_scale_range2=(0.05, 1.0),
    gray_noise_prob2=0.4,
    jpeg_range2=(60, 100),
    kernel1=KernelConfig(
        kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 3), betag_range=(0.5, 4), betap_range=(1, 2)
    ),
    kernel2=KernelConfig(
        kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 4), betap_range=(1, 2)
    ),
    final_sinc_prob=0.8,
    # PiSA-SR's dataset brings the LR back to the HR size with a randomly chosen interpolation
    # (area / bilinear / bicubic) before its final clamp-and-round (src/datasets/realesrgan.py)
    lr_upsample_modes=RESIZE_MODES,
)

# S3Diff (configs/sr.yaml + src/my_utils/training_utils.py): milder kernels; like Real-ESRGAN's
# dataset, BOTH kernel sizes are drawn from 7..21 (the config's blur_kernel_size2 = 11 is never
# read: the code uses a hard-coded kernel_range); the LR is clamped but not rounded to 8 bits; the
# model input is a bicubic upsampling; 1 % of batches get the HR itself as input.
_S3DIFF = dataclasses.replace(
    _PISA,
    kernel1=KernelConfig(
        kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 2), betap_range=(1, 1.5)
    ),
    kernel2=KernelConfig(
        kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.0), betag_range=(0.5, 2), betap_range=(1, 1.5)
    ),
    round_output=False,
    lr_upsample_modes=("bicubic",),
    no_degradation_prob=0.01,
)

#: Named configurations: "pisa" = PiSA-SR's src/datasets/params.yml, "s3diff" = S3Diff's
#: configs/sr.yaml (``degradation`` section + ``train`` kernel settings).
PRESETS: dict[str, DegradationConfig] = {"pisa": _PISA, "s3diff": _S3DIFF}


def get_preset(name: str) -> DegradationConfig:
    """The preset configuration called ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown degradation preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------------- #
# Bessel J1
# --------------------------------------------------------------------------------------------- #

_J1_QUAD_POINTS = 128
_J1_ASYMPTOTIC_FROM = 50.0
_J1_CHUNK = 1 << 15


def bessel_j1(x: Tensor | float | Sequence[float]) -> Tensor:
    """Bessel function of the first kind, order 1, in float64 (absolute error ~1e-15).

    For ``|x| <= 50`` it evaluates Bessel's integral ``J1(x) = 1/(2 pi) * int_{-pi}^{pi}
    cos(t - x sin t) dt`` with the trapezoidal rule on 128 points, which converges
    geometrically for this periodic analytic integrand (the error is of the order of
    ``J_127(x)``).  Beyond that it uses Hankel's asymptotic expansion, truncated at its
    smallest term.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    sign = torch.sign(xt)
    ax = xt.abs().reshape(-1)
    out = torch.zeros_like(ax)

    near = ax <= _J1_ASYMPTOTIC_FROM
    if bool(near.any()):
        xs = ax[near]
        n = _J1_QUAD_POINTS
        t = torch.arange(n, dtype=torch.float64, device=ax.device) * (2.0 * math.pi / n) - math.pi
        sin_t = torch.sin(t)
        vals = []
        for chunk in xs.split(_J1_CHUNK):
            vals.append(torch.cos(t[None, :] - chunk[:, None] * sin_t[None, :]).mean(dim=1))
        out[near] = torch.cat(vals)

    far = ~near
    if bool(far.any()):
        xf = ax[far]
        mu = 4.0  # 4 * nu**2 with nu = 1
        p = torch.ones_like(xf)
        q = torch.zeros_like(xf)
        term = torch.ones_like(xf)
        for k in range(1, 30):
            term = term * (mu - (2 * k - 1) ** 2) / (k * 8.0 * xf)
            if k % 2 == 1:
                q = q + (-1) ** ((k - 1) // 2) * term
            else:
                p = p + (-1) ** (k // 2) * term
        chi = xf - 0.75 * math.pi
        out[far] = torch.sqrt(2.0 / (math.pi * xf)) * (p * torch.cos(chi) - q * torch.sin(chi))

    return (out.reshape(xt.shape) * sign).to(torch.float64)


# --------------------------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------------------------- #


def _check_size(size: Any, name: str = "size") -> int:
    if not _is_number(size) or not math.isfinite(float(size)) or float(size) != int(size) or int(size) < 1:
        raise ConfigError(f"kernel {name} must be an odd positive integer, got {size!r}")
    if int(size) % 2 == 0:
        raise ConfigError(f"kernel {name} must be an odd positive integer, got {size!r}")
    return int(size)


def _positive(name: str, v: Any) -> float:
    if not _is_number(v) or not 0.0 < float(v) < math.inf:
        raise ConfigError(f"kernel {name} must be a positive finite number, got {v!r}")
    return float(v)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _quad_form(size: int, sigma_x: float, sigma_y: float | None, rotation: float) -> Tensor:
    """``q = p^T Sigma^-1 p`` on the kernel grid, Sigma = R(rotation) diag(sx^2, sy^2) R^T."""
    size = _check_size(size)
    sx = _positive("sigma_x", sigma_x)
    sy = sx if sigma_y is None else _positive("sigma_y", sigma_y)
    if not _is_number(rotation) or not math.isfinite(float(rotation)):
        raise ConfigError(f"kernel rotation must be a finite number of radians, got {rotation!r}")
    xx, yy = _grid(size)
    c, s = math.cos(float(rotation)), math.sin(float(rotation))
    u = c * xx + s * yy  # coordinates in the kernel's principal frame
    v = -s * xx + c * yy
    return (u / sx) ** 2 + (v / sy) ** 2


def _normalised(k: Tensor) -> Tensor:
    return (k / k.sum()).to(torch.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0) -> Tensor:
    """Bivariate Gaussian kernel (isotropic when ``sigma_y`` is None), float32 (size, size), sum 1.

    ``rotation`` (radians) turns the ``sigma_x`` axis counter-clockwise from the column axis.
    """
    return _normalised(torch.exp(-0.5 * _quad_form(size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0, beta: float = 1.0
) -> Tensor:
    """Generalised Gaussian ``exp(-0.5 * q**beta)``; ``beta = 1`` is the Gaussian."""
    b = _positive("beta", beta)
    return _normalised(torch.exp(-0.5 * _quad_form(size, sigma_x, sigma_y, rotation) ** b))


def plateau_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0, beta: float = 1.0
) -> Tensor:
    """Plateau-shaped kernel ``1 / (1 + q**beta)``: flat top, heavier tails for small beta."""
    b = _positive("beta", beta)
    return _normalised(1.0 / (1.0 + _quad_form(size, sigma_x, sigma_y, rotation) ** b))


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a centred (k, k) kernel to (size, size); ``size - k`` must be even and >= 0."""
    k = kernel.shape[-1]
    size = _check_size(size, "pad size")
    if size < k or (size - k) % 2:
        raise ConfigError(f"pad size must be odd and >= the kernel size {k}, got {size}")
    p = (size - k) // 2
    return F.pad(kernel, (p, p, p, p)) if p else kernel


def sinc_kernel(size: int, omega_c: float, pad_to: int | None = None) -> Tensor:
    """2-D circularly symmetric low-pass ("sinc") kernel with cut-off ``omega_c`` (radians/pixel).

    ``k(r) = omega_c * J1(omega_c * r) / (2 pi r)``, centre ``omega_c**2 / (4 pi)``, normalised to
    sum 1 and optionally zero-padded to ``pad_to``.
    """
    size = _check_size(size)
    if not _is_number(omega_c) or not 0.0 < float(omega_c) <= math.pi:
        raise ConfigError(f"sinc omega_c must be in (0, pi], got {omega_c!r}")
    w = float(omega_c)
    xx, yy = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    k = torch.where(
        r > 0, w * bessel_j1(w * r_safe) / (2.0 * math.pi * r_safe), torch.full_like(r, w * w / (4 * math.pi))
    )
    k = _normalised(k)
    return pad_kernel(k, pad_to) if pad_to is not None else k


def _delta_kernel(size: int) -> Tensor:
    k = torch.zeros(size, size, dtype=torch.float32)
    k[size // 2, size // 2] = 1.0
    return k


def kernel_from_params(params: Mapping[str, Any], pad_to: int | None = None) -> Tensor:
    """Rebuild a kernel from the dict recorded by :func:`sample_kernel` / :func:`sample_params`.

    Types: the six of :data:`KERNEL_TYPES` (keys size, sigma_x, sigma_y, rotation, beta for the
    generalised / plateau ones), ``"sinc"`` (size, omega_c) and ``"identity"`` (a delta).
    """
    if not isinstance(params, Mapping) or "type" not in params:
        raise ConfigError(f"kernel params must be a mapping with a 'type' key, got {params!r}")
    kind = params["type"]
    try:
        if kind == "identity":
            size = int(params.get("size", 1))
            kernel = _delta_kernel(_check_size(size))
        elif kind == "sinc":
            kernel = sinc_kernel(params["size"], params["omega_c"])
        elif kind in ("iso", "aniso"):
            kernel = gaussian_kernel(params["size"], params["sigma_x"], params["sigma_y"], params["rotation"])
        elif kind in ("generalized_iso", "generalized_aniso"):
            kernel = generalized_gaussian_kernel(
                params["size"], params["sigma_x"], params["sigma_y"], params["rotation"], params["beta"]
            )
        elif kind in ("plateau_iso", "plateau_aniso"):
            kernel = plateau_kernel(
                params["size"], params["sigma_x"], params["sigma_y"], params["rotation"], params["beta"]
            )
        else:
            allowed = [*KERNEL_TYPES, "sinc", "identity"]
            raise ConfigError(f"kernel type must be one of {allowed}, got {kind!r}")
    except KeyError as exc:
        raise ConfigError(
            f"kernel params of type {kind!r} lack key {exc.args[0]!r}: {dict(params)!r}"
        ) from None
    return pad_kernel(kernel, pad_to) if pad_to is not None else kernel


# ----------------------------------- random draws ----------------------------------- #


def _device_of(g: torch.Generator | None) -> torch.device:
    return g.device if g is not None else torch.device("cpu")


def _rand(g: torch.Generator | None) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64, device=_device_of(g)).item())


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _choice(g: torch.Generator | None, items: Sequence[Any], probs: Sequence[float] | None = None) -> Any:
    if probs is None:
        idx = int(torch.randint(len(items), (), generator=g, device=_device_of(g)).item())
        return items[idx]
    u = _rand(g) * sum(probs)
    acc = 0.0
    for item, p in zip(items, probs, strict=True):
        acc += p
        if u < acc:
            return item
    # rounding fallback: the last item with non-zero probability
    return next(item for item, p in zip(reversed(items), reversed(probs), strict=True) if p > 0)


def _two_sided_beta(g: torch.Generator | None, rng: tuple[float, float]) -> float:
    # Real-ESRGAN: with probability 1/2 below 1, else above 1
    if _rand(g) < 0.5:
        return _uniform(g, rng[0], 1.0)
    return _uniform(g, 1.0, rng[1])


def _sample_kernel_params(cfg: KernelConfig, g: torch.Generator | None) -> dict[str, Any]:
    size = _choice(g, list(range(_MIN_KERNEL, cfg.kernel_size + 1, 2)))
    if _rand(g) < cfg.sinc_prob:
        lo = math.pi / 3 if size < 13 else math.pi / 5
        return {"type": "sinc", "size": size, "omega_c": _uniform(g, lo, math.pi)}
    kind = _choice(g, cfg.kernel_list, cfg.kernel_prob)
    sigma_x = _uniform(g, *cfg.blur_sigma)
    if kind.endswith("aniso"):
        sigma_y = _uniform(g, *cfg.blur_sigma)
        rotation = _uniform(g, -math.pi, math.pi)
    else:
        sigma_y, rotation = sigma_x, 0.0
    out: dict[str, Any] = {
        "type": kind,
        "size": size,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "rotation": rotation,
    }
    if kind.startswith("generalized"):
        out["beta"] = _two_sided_beta(g, cfg.betag_range)
    elif kind.startswith("plateau"):
        out["beta"] = _two_sided_beta(g, cfg.betap_range)
    return out


def sample_kernel(
    cfg: KernelConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Draw one blur kernel as Real-ESRGAN does; returns (float32 (K, K) kernel, its params).

    The kernel is padded to ``cfg.kernel_size``.  ``params`` is JSON-able and rebuilds the same
    kernel through :func:`kernel_from_params`.
    """
    params = _sample_kernel_params(cfg, generator)
    return kernel_from_params(params, pad_to=cfg.kernel_size), params


# --------------------------------------------------------------------------------------------- #
# image operations
# --------------------------------------------------------------------------------------------- #


def filter2d(img: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample 2-D filtering (correlation, as cv2.filter2D) with reflect padding.

    ``img`` (B, C, H, W); ``kernels`` (B, k, k) or (k, k) with k odd.  Falls back to replicate
    padding when the image is too small for reflection.
    """
    b, c, h, w = img.shape
    if kernels.dim() == 2:
        kernels = kernels.expand(b, -1, -1)
    k = kernels.shape[-1]
    if k % 2 == 0 or kernels.shape[0] != b:
        raise ConfigError(f"kernels must be (B, k, k) with odd k and B={b}, got {tuple(kernels.shape)}")
    p = k // 2
    mode = "reflect" if p < h and p < w else "replicate"
    x = F.pad(img, (p, p, p, p), mode=mode)
    weight = kernels.to(img.dtype)[:, None].expand(b, c, k, k).reshape(b * c, 1, k, k)
    out = F.conv2d(x.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.reshape(b, c, h, w)


_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, as Real-ESRGAN uses


def add_gaussian_noise(
    img: Tensor,
    sigma: float | Tensor,
    gray: bool = False,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """``img + N(0, (sigma/255)^2)``; ``sigma`` on the 0..255 scale (float or (B,) tensor).

    With ``gray`` the same noise field is added to all three channels.
    """
    b, c, h, w = img.shape
    shape = (b, 1, h, w) if gray else (b, c, h, w)
    noise = torch.randn(shape, generator=generator, dtype=img.dtype, device=img.device)
    s = torch.as_tensor(sigma, dtype=img.dtype, device=img.device).reshape(-1, 1, 1, 1) / 255.0
    out = img + noise * s
    return out.clamp(0.0, 1.0) if clip else out


def _poisson_field(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Shot-noise residual for (b, c, h, w) ``x``, per sample (Real-ESRGAN / skimage form)."""
    xq = torch.clamp((x * 255.0).round(), 0, 255) / 255.0
    noise = torch.empty_like(xq)
    for i in range(xq.shape[0]):
        n_unique = int(torch.unique(xq[i]).numel())
        vals = float(2.0 ** math.ceil(math.log2(n_unique)))
        noise[i] = torch.poisson(xq[i] * vals, generator=generator) / vals - xq[i]
    return noise


def add_poisson_noise(
    img: Tensor,
    scale: float | Tensor,
    gray: bool = False,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Tensor:
    """Poisson (shot) noise as in Real-ESRGAN.

    The image is quantised to 8 bits, ``vals = 2**ceil(log2(#unique levels))`` per sample, and
    the noise is ``(Poisson(x * vals) / vals - x) * scale``.  With ``gray`` the noise is drawn on
    the luma image and added to all channels.
    """
    if gray:
        wts = torch.tensor(_GRAY_WEIGHTS, dtype=img.dtype, device=img.device).reshape(1, 3, 1, 1)
        base = (img * wts).sum(dim=1, keepdim=True)
    else:
        base = img
    noise = _poisson_field(base, generator)
    s = torch.as_tensor(scale, dtype=img.dtype, device=img.device).reshape(-1, 1, 1, 1)
    out = img + noise * s
    return out.clamp(0.0, 1.0) if clip else out


# ----------------------------------------- JPEG ----------------------------------------- #

# IJG (JPEG standard, Annex K) base quantisation tables, natural (row = vertical frequency) order.
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA_TOP = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))


def _chroma_base() -> Tensor:
    t = torch.full((8, 8), 99.0, dtype=torch.float64)
    t[:4, :4] = torch.tensor(_JPEG_CHROMA_TOP, dtype=torch.float64)
    return t


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal 8-point DCT-II matrix D (coefficients = D @ block @ D.T), JPEG's FDCT."""
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * 0.5
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def _as_quality(quality: float | Sequence[float] | Tensor, b: int) -> Tensor:
    q = torch.as_tensor(quality, dtype=torch.float64).detach().cpu().reshape(-1)
    if q.numel() == 1:
        q = q.expand(b)
    if q.numel() != b:
        raise ConfigError(f"quality must be one number or one per sample ({b}), got {q.numel()} values")
    if not bool(((q >= 1) & (q <= 100)).all()):
        raise ConfigError(f"quality must be in [1, 100], got {q.tolist()}")
    return q


def jpeg_quality_tables(quality: float | Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """IJG-scaled luminance and chrominance tables, each (B, 8, 8) float64.

    ``s = 5000/q`` for ``q < 50`` else ``200 - 2q``; ``table = floor((T*s + 50) / 100)`` clamped
    to [1, 255] (baseline).  Non-integer qualities are allowed (Real-ESRGAN draws them uniformly).
    """
    q = _as_quality(quality, torch.as_tensor(quality).numel())
    s = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q).reshape(-1, 1, 1)

    def scaled(base: Tensor) -> Tensor:
        return torch.floor((base[None] * s + 50.0) / 100.0).clamp(1.0, 255.0)

    return scaled(torch.tensor(_JPEG_LUMA, dtype=torch.float64)), scaled(_chroma_base())


def _diff_round(x: Tensor) -> Tensor:
    r = torch.round(x)
    return r + (x - r) ** 3


def _code_plane(plane: Tensor, table: Tensor, d: Tensor, rnd: Callable[[Tensor], Tensor]) -> Tensor:
    """Level shift, 8x8 DCT, quantise, dequantise, IDCT one (B, 1, H, W) plane (H, W % 8 == 0)."""
    b, _, h, w = plane.shape
    blocks = (plane - 128.0).reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3)  # (b, nh, nw, 8, 8)
    coef = d @ blocks @ d.T
    t = table[:, None, None]
    coef = rnd(coef / t) * t
    rec = d.T @ coef @ d + 128.0
    return rec.transpose(2, 3).reshape(b, 1, h, w)


def jpeg_compress(
    img: Tensor, quality: float | Sequence[float] | Tensor, differentiable: bool = False
) -> Tensor:
    """Simulated baseline JPEG (4:2:0) encode + decode of a batch, per-sample quality.

    ``img`` (B, 3, H, W) RGB in [0, 1] -> same shape, clamped to [0, 1] (not rounded to 8 bits).
    Steps: RGB -> full-range YCbCr, 2x2-average chroma subsampling, 8x8 DCT, quantisation with
    IJG-scaled tables, rounding (``round(x) + (x - round(x))**3`` when ``differentiable``),
    dequantisation, IDCT, chroma upsampling with libjpeg's "fancy" triangle filter (= bilinear at
    x2), YCbCr -> RGB.  The image is edge-padded to a multiple of 16 and cropped back.
    """
    if img.dim() != 4 or img.shape[1] != 3:
        raise ConfigError(f"jpeg_compress needs img of shape (B, 3, H, W), got {tuple(img.shape)}")
    b, _, h, w = img.shape
    ytab, ctab = jpeg_quality_tables(_as_quality(quality, b))
    dtype, dev = img.dtype, img.device
    ytab, ctab = ytab.to(dtype=dtype, device=dev), ctab.to(dtype=dtype, device=dev)
    rnd = _diff_round if differentiable else torch.round

    ph, pw = (-h) % 16, (-w) % 16
    x = img * 255.0
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    r, g, bl = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128.0
    cb = F.avg_pool2d(cb, 2)
    cr = F.avg_pool2d(cr, 2)

    d = _dct_matrix(dtype, dev)
    y = _code_plane(y, ytab, d, rnd)
    cb = _code_plane(cb, ctab, d, rnd)
    cr = _code_plane(cr, ctab, d, rnd)
    cb = F.interpolate(cb, scale_factor=2, mode="bilinear", align_corners=False) - 128.0
    cr = F.interpolate(cr, scale_factor=2, mode="bilinear", align_corners=False) - 128.0

    out = torch.cat([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    out = out[:, :, :h, :w]
    return out.clamp(0.0, 255.0) / 255.0


# --------------------------------------------------------------------------------------------- #
# parameter sampling
# --------------------------------------------------------------------------------------------- #

_SEED_LIMIT = 1 << 53  # exactly representable in JSON numbers


def _sample_resize(
    g: torch.Generator | None, probs: Sequence[float], rng: tuple[float, float], cfg: DegradationConfig
) -> dict[str, Any]:
    updown = _choice(g, _UPDOWN, probs)
    if updown == "up":
        factor = _uniform(g, 1.0, rng[1])
    elif updown == "down":
        factor = _uniform(g, rng[0], 1.0)
    else:
        factor = 1.0
    return {"updown": updown, "scale": factor, "mode": _choice(g, cfg.resize_modes, cfg.resize_mode_prob)}


def _sample_noise(
    g: torch.Generator | None,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> dict[str, Any]:
    if _rand(g) < gaussian_prob:
        out: dict[str, Any] = {"type": "gaussian", "sigma": _uniform(g, *sigma_range)}
    else:
        out = {"type": "poisson", "scale": _uniform(g, *poisson_range)}
    out["gray"] = _rand(g) < gray_prob
    return out


def _sample_one(cfg: DegradationConfig, g: torch.Generator | None) -> dict[str, Any]:
    p: dict[str, Any] = {}
    p["kernel1"] = _sample_kernel_params(cfg.kernel1, g)
    p["resize1"] = _sample_resize(g, cfg.resize_prob, cfg.resize_range, cfg)
    p["noise1"] = _sample_noise(
        g, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob
    )
    p["jpeg1"] = {"quality": _uniform(g, *cfg.jpeg_range)}
    p["second_blur"] = _rand(g) < cfg.second_blur_prob
    p["kernel2"] = _sample_kernel_params(cfg.kernel2, g)
    p["resize2"] = _sample_resize(g, cfg.resize_prob2, cfg.resize_range2, cfg)
    p["noise2"] = _sample_noise(
        g, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2
    )
    p["final_order"] = "resize_first" if _rand(g) < cfg.final_resize_first_prob else "jpeg_first"
    p["final_resize_mode"] = _choice(g, cfg.resize_modes, cfg.resize_mode_prob)
    if _rand(g) < cfg.final_sinc_prob:
        size = _choice(g, list(range(_MIN_KERNEL, cfg.final_sinc_kernel_size + 1, 2)))
        p["final_sinc"] = {"type": "sinc", "size": size, "omega_c": _uniform(g, math.pi / 3, math.pi)}
    else:
        p["final_sinc"] = {"type": "identity", "size": 1}
    p["jpeg2"] = {"quality": _uniform(g, *cfg.jpeg_range2)}
    p["seed"] = int(torch.randint(_SEED_LIMIT, (), generator=g, device=_device_of(g)).item())
    return p


def sample_params(
    cfg: DegradationConfig, batch_size: int, generator: torch.Generator | None = None
) -> list[dict[str, Any]]:
    """Draw every random choice of ``batch_size`` degradations into JSON-able dicts.

    Keys per sample: kernel1, resize1 {updown, scale, mode}, noise1 {type, sigma|scale, gray},
    jpeg1 {quality}, second_blur, kernel2, resize2, noise2, final_order ("resize_first" |
    "jpeg_first"), final_resize_mode, final_sinc (a sinc or identity kernel), jpeg2, seed (the
    integer that seeds the sample's noise).  ``generator=None`` uses torch's global generator.
    """
    if not isinstance(cfg, DegradationConfig):
        raise ConfigError(f"cfg must be a DegradationConfig, got {type(cfg).__name__}")
    batch_size = _as_int("batch_size", batch_size, 1, 1 << 20)
    return [_sample_one(cfg, generator) for _ in range(batch_size)]


# --------------------------------------------------------------------------------------------- #
# applying parameters
# --------------------------------------------------------------------------------------------- #

_PARAM_KEYS = (
    "kernel1",
    "resize1",
    "noise1",
    "jpeg1",
    "second_blur",
    "kernel2",
    "resize2",
    "noise2",
    "final_order",
    "final_resize_mode",
    "final_sinc",
    "jpeg2",
    "seed",
)


def _check_params(params: Sequence[Mapping[str, Any]], b: int) -> None:
    if isinstance(params, Mapping) or not isinstance(params, Sequence) or len(params) != b:
        n = len(params) if isinstance(params, Sequence) else type(params).__name__
        raise ConfigError(f"params must be a list of one dict per sample ({b}), got {n}")
    for i, p in enumerate(params):
        if not isinstance(p, Mapping):
            raise ConfigError(f"params[{i}] must be a dict, got {type(p).__name__}")
        missing = [k for k in _PARAM_KEYS if k not in p]
        if missing:
            raise ConfigError(f"params[{i}] lacks key(s) {missing}; expected keys: {list(_PARAM_KEYS)}")
        for key in (
            "kernel1",
            "resize1",
            "noise1",
            "jpeg1",
            "kernel2",
            "resize2",
            "noise2",
            "final_sinc",
            "jpeg2",
        ):
            if not isinstance(p[key], Mapping):
                raise ConfigError(f"params[{i}].{key} must be a dict, got {type(p[key]).__name__}")
        if p["final_order"] not in ("resize_first", "jpeg_first"):
            raise ConfigError(
                f"params[{i}].final_order must be 'resize_first' or 'jpeg_first', got {p['final_order']!r}"
            )
        for key in ("resize1", "resize2"):
            if p[key].get("mode") not in RESIZE_MODES:
                raise ConfigError(
                    f"params[{i}].{key}.mode must be one of {list(RESIZE_MODES)}, got {p[key].get('mode')!r}"
                )
        if p["final_resize_mode"] not in RESIZE_MODES:
            raise ConfigError(
                f"params[{i}].final_resize_mode must be one of {list(RESIZE_MODES)}, got {p['final_resize_mode']!r}"
            )
        for key in ("noise1", "noise2"):
            if p[key].get("type") not in ("gaussian", "poisson"):
                raise ConfigError(
                    f"params[{i}].{key}.type must be 'gaussian' or 'poisson', got {p[key].get('type')!r}"
                )


def _grouped(
    xs: list[Tensor | None],
    keys: Sequence[Hashable | None],
    fn: Callable[[Tensor, list[int]], Tensor],
) -> list[Tensor | None]:
    """Apply ``fn`` to batches of samples that share spatial size and key (None key: skip)."""
    groups: dict[Hashable, list[int]] = {}
    for i, (x, key) in enumerate(zip(xs, keys, strict=True)):
        if key is None or x is None:
            continue
        groups.setdefault((tuple(x.shape[-2:]), key), []).append(i)
    out = list(xs)
    for idx in groups.values():
        res = fn(torch.cat([xs[i] for i in idx]), idx)  # type: ignore[misc]
        for j, i in enumerate(idx):
            out[i] = res[j : j + 1]
    return out


def _resize(
    x: Tensor, mode: str, *, size: tuple[int, int] | None = None, factor: float | None = None
) -> Tensor:
    kw: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
    if size is not None:
        return F.interpolate(x, size=size, mode=mode, **kw)
    h, w = x.shape[-2:]
    if math.floor(h * factor) < 1 or math.floor(w * factor) < 1:  # type: ignore[operator]
        return F.interpolate(
            x, size=(max(1, math.floor(h * factor)), max(1, math.floor(w * factor))), mode=mode, **kw
        )  # type: ignore[operator]
    return F.interpolate(x, scale_factor=factor, mode=mode, **kw)


def _derive_seed(seed: int, stage: int) -> int:
    # distinct, well-mixed stream per (sample seed, noise stage); splitmix64 finaliser
    z = (int(seed) + 0x9E3779B97F4A7C15 * (stage + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _apply_noise(x: Tensor, spec: Mapping[str, Any], seed: int) -> Tensor:
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    gray = bool(spec.get("gray", False))
    if spec["type"] == "gaussian":
        return add_gaussian_noise(x, float(spec["sigma"]), gray=gray, generator=g)
    return add_poisson_noise(x, float(spec["scale"]), gray=gray, generator=g)


def degrade(hr: Tensor, params: Sequence[Mapping[str, Any]], cfg: DegradationConfig) -> Tensor:
    """Apply recorded degradations: ``hr`` (B, 3, H, W) in [0, 1] -> (B, 3, H//scale, W//scale).

    Samples are processed together wherever they share a spatial size and the operation's
    settings (grouped conv2d for per-sample kernels, per-sample JPEG quality), one by one only
    where sizes differ (after the random resizes).  Noise comes from a per-sample generator
    seeded from ``params[i]["seed"]``.  Deterministic, and each sample's result is independent
    of the rest of the batch.
    """
    if not isinstance(cfg, DegradationConfig):
        raise ConfigError(f"cfg must be a DegradationConfig, got {type(cfg).__name__}")
    if not isinstance(hr, Tensor) or hr.dim() != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        shape = tuple(hr.shape) if isinstance(hr, Tensor) else type(hr).__name__
        raise ConfigError(f"hr must be a float tensor of shape (B, 3, H, W), got {shape}")
    b, _, h, w = hr.shape
    sf = cfg.scale
    if h // sf < 1 or w // sf < 1:
        raise ConfigError(f"hr height and width must be >= scale ({sf}), got {h}x{w}")
    _check_params(params, b)
    dev = hr.device
    x = hr.to(torch.float32)

    def kernels(key: str, size: int) -> Tensor:
        return torch.stack([kernel_from_params(p[key], pad_to=size) for p in params]).to(dev)

    k1 = kernels("kernel1", cfg.kernel1.kernel_size)
    k2 = kernels("kernel2", cfg.kernel2.kernel_size)
    ks = kernels("final_sinc", cfg.final_sinc_kernel_size)
    q1 = [float(p["jpeg1"]["quality"]) for p in params]
    q2 = [float(p["jpeg2"]["quality"]) for p in params]

    def jpeg(q: list[float]) -> Callable[[Tensor, list[int]], Tensor]:
        return lambda t, idx: jpeg_compress(t.clamp(0.0, 1.0), [q[i] for i in idx])

    # ---- first degradation ----
    xs: list[Tensor | None] = list(filter2d(x, k1).split(1))
    xs = _grouped(
        xs,
        [(p["resize1"]["mode"], float(p["resize1"]["scale"])) for p in params],
        lambda t, idx: _resize(
            t, params[idx[0]]["resize1"]["mode"], factor=float(params[idx[0]]["resize1"]["scale"])
        ),
    )
    xs = [_apply_noise(t, p["noise1"], _derive_seed(p["seed"], 0)) for t, p in zip(xs, params, strict=True)]  # type: ignore[arg-type]
    xs = _grouped(xs, ["jpeg"] * b, jpeg(q1))

    # ---- second degradation ----
    xs = _grouped(
        xs, ["blur" if p["second_blur"] else None for p in params], lambda t, idx: filter2d(t, k2[idx])
    )

    def size2(p: Mapping[str, Any]) -> tuple[int, int]:
        s = float(p["resize2"]["scale"])
        return (max(1, int(h / sf * s)), max(1, int(w / sf * s)))

    xs = _grouped(
        xs,
        [(p["resize2"]["mode"], size2(p)) for p in params],
        lambda t, idx: _resize(t, params[idx[0]]["resize2"]["mode"], size=size2(params[idx[0]])),
    )
    xs = [_apply_noise(t, p["noise2"], _derive_seed(p["seed"], 1)) for t, p in zip(xs, params, strict=True)]  # type: ignore[arg-type]

    # ---- final stage: [resize + sinc] and JPEG2 in the recorded order ----
    target = (h // sf, w // sf)
    xs = _grouped(xs, ["jpeg" if p["final_order"] == "jpeg_first" else None for p in params], jpeg(q2))
    xs = _grouped(
        xs,
        [p["final_resize_mode"] for p in params],
        lambda t, idx: _resize(t, params[idx[0]]["final_resize_mode"], size=target),
    )
    out = filter2d(torch.cat(xs), ks)  # type: ignore[arg-type]
    xs = list(out.split(1))
    xs = _grouped(xs, ["jpeg" if p["final_order"] == "resize_first" else None for p in params], jpeg(q2))
    out = torch.cat(xs)  # type: ignore[arg-type]

    out = out.clamp(0.0, 1.0)
    if cfg.round_output:
        out = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    return out


class Degrader:
    """Convenience wrapper: ``lr, params = Degrader(cfg)(hr, generator)``.

    ``cfg`` may be a :class:`DegradationConfig` or a preset name.
    """

    def __init__(self, cfg: DegradationConfig | str = "pisa") -> None:
        self.cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
        if not isinstance(self.cfg, DegradationConfig):
            raise ConfigError(f"cfg must be a DegradationConfig or a preset name, got {type(cfg).__name__}")

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> list[dict[str, Any]]:
        return sample_params(self.cfg, batch_size, generator)

    def __call__(
        self, hr: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[dict[str, Any]]]:
        if not isinstance(hr, Tensor) or hr.dim() != 4:
            shape = tuple(hr.shape) if isinstance(hr, Tensor) else type(hr).__name__
            raise ConfigError(f"hr must be a float tensor of shape (B, 3, H, W), got {shape}")
        params = sample_params(self.cfg, hr.shape[0], generator)
        return degrade(hr, params, self.cfg), params

    def __repr__(self) -> str:
        return f"Degrader(scale={self.cfg.scale})"


# --------------------------------------------------------------------------------------------- #
# training-data helpers
# --------------------------------------------------------------------------------------------- #


def training_inputs(
    hr: Tensor, cfg: DegradationConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A training batch's inputs from HR crops, as the authors' training scripts make them.

    ``hr`` (B, 3, H, W) in [0, 1] → ``(lr, lr_up)``: ``lr`` (B, 3, H/scale, W/scale), the degraded
    image (what a degradation estimator sees), and ``lr_up`` (B, 3, H, W), the model's input: the
    unrounded LR interpolated back to H×W with a mode drawn from ``cfg.lr_upsample_modes``, then
    clamped (and rounded to 8 bits when ``cfg.round_output``, once, at the HR size, as PiSA-SR's
    dataset does); with probability ``cfg.no_degradation_prob`` (per batch) ``lr_up`` is ``hr``.
    Draws, in order from ``generator``: :func:`sample_params`, the mode, the no-degradation coin.
    """
    params = sample_params(cfg, hr.shape[0], generator)
    raw = degrade(hr, params, dataclasses.replace(cfg, round_output=False))
    mode = _choice(generator, cfg.lr_upsample_modes)
    up = _resize(raw, mode, size=tuple(hr.shape[-2:])).clamp(0.0, 1.0)
    if cfg.round_output:
        raw, up = ((t * 255.0).round().clamp(0, 255) / 255.0 for t in (raw, up))
    if _rand(generator) < cfg.no_degradation_prob:
        up = hr.to(up.dtype)
    return raw, up


def upsample_to_hr(lr: Tensor, scale: int) -> Tensor:
    """Bicubic x``scale`` upsampling (align_corners=False), clamped to [0, 1]."""
    scale = _as_int("scale", scale, 1, 64)
    if lr.dim() != 4:
        raise ConfigError(f"lr must have shape (B, C, h, w), got {tuple(lr.shape)}")
    h, w = lr.shape[-2:]
    up = F.interpolate(lr, size=(h * scale, w * scale), mode="bicubic", align_corners=False)
    return up.clamp(0.0, 1.0)


def crop_to_multiple(img: Tensor | np.ndarray, m: int) -> Tensor | np.ndarray:
    """Crop height and width down to multiples of ``m`` (keeping the top-left corner).

    Tensors are (..., H, W); numpy arrays are (H, W) or (H, W, C).
    """
    m = _as_int("m", m, 1, 1 << 16)
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise ConfigError(f"numpy img must be (H, W) or (H, W, C), got shape {img.shape}")
        h, w = img.shape[:2]
        if h < m or w < m:
            raise ConfigError(f"img height and width must be >= m ({m}), got {h}x{w}")
        return img[: h - h % m, : w - w % m]
    if isinstance(img, Tensor):
        if img.dim() < 2:
            raise ConfigError(f"tensor img must have at least 2 dims (..., H, W), got {tuple(img.shape)}")
        h, w = img.shape[-2:]
        if h < m or w < m:
            raise ConfigError(f"img height and width must be >= m ({m}), got {h}x{w}")
        return img[..., : h - h % m, : w - w % m]
    raise ConfigError(f"img must be a torch.Tensor or numpy.ndarray, got {type(img).__name__}")
