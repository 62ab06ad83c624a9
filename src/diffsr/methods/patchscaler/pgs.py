"""Patch-adaptive Group Sampling (PGS), PatchScaler §3.2: a training-free sampler for any multi-step
x0-predicting denoiser (Patch-DiT with V = 16, StableSR with V = 64, ...).

The coarse latent y0 is cut into overlapping V×V windows. Each window is put into a group by the mean
of the confidence map C over it (Eq. 2), and each group is sampled on its own shortcut path: start from
y_τ = √ᾱ_τ y0 + √(1−ᾱ_τ) ε (Eq. 6/7) and take exactly N denoiser calls at t = τ … 1. The windows are
fused once at the end.

From the paper: the grouping rule and its exact interval boundaries (Eq. 2), γ = (0.95, 0.75),
τ = (400, 700, 1000), N = (8, 14, 20), x0-prediction, the start point, the 2-GPU split (hard on one
device, simple + medium on the other). Ours, where the paper is silent (PATCHSCALER.md D7, D13, D15):
DDIM η = 0 with timesteps round(linspace(τ, 1, N)); output = the x̂0 of the call at t = 1; stride 12
with the last window snapped to the border; reflect padding (bottom/right) of inputs smaller than V;
one global noise map drawn on the CPU and cropped per window; Gaussian fusion weights (StableSR's
σ = 0.1·V). Per-step fusion (MultiDiffusion, StableSR) is impossible here: neighbouring windows are
on different schedules.

Timesteps t are 1-based throughout: ᾱ_t = alphas_cumprod[t − 1].
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from ...devices import resolve_device
from ...errors import ConfigError
from ...latents import gaussian_weights, tile_starts

__all__ = [
    "DEFAULT_GROUPS",
    "DEFAULT_THRESHOLDS",
    "WEIGHTS",
    "Denoiser",
    "GroupSpec",
    "PatchGroupSampler",
    "assign_groups",
    "ddim_step",
    "fuse_patches",
    "group_timesteps",
    "mean_confidence",
    "patch_grid",
    "split_patches",
    "start_latent",
    "theoretical_speedup",
]

Denoiser = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""f(x_t (b,C,V,V), t (b,) long 1-based, y0 (b,C,V,V), idx (b,) long global window indices) → x̂0 (b,C,V,V)."""

ProgressFn = Callable[[dict], None]
WEIGHTS = ("gaussian", "ramp", "uniform")


def _int(value, name: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def group_timesteps(tau: int, steps: int) -> list[int]:
    """The N timesteps of one group: round(linspace(τ, 1, N)), strictly decreasing, first τ, last 1.

    Rounded exactly (rational arithmetic, halves to even). N = 1 gives [τ]; N must be in [1, τ]."""
    tau, steps = _int(tau, "tau"), _int(steps, "steps")
    if tau < 1:
        raise ConfigError(f"tau={tau} must be >= 1 (timesteps are 1-based)")
    if not 1 <= steps <= tau:
        raise ConfigError(
            f"steps={steps} must be in [1, tau={tau}] (one denoiser call per distinct timestep)"
        )
    if steps == 1:
        return [tau]
    # linspace value i is (τ·(N−1) − (τ−1)·i) / (N−1); consecutive values differ by ≥ 1, so the
    # rounded list stays strictly decreasing.
    return [round(Fraction(tau * (steps - 1) - (tau - 1) * i, steps - 1)) for i in range(steps)]


@dataclass(frozen=True)
class GroupSpec:
    """One PGS group: start at timestep `tau` (1-based) and make exactly `steps` denoiser calls."""

    name: str
    tau: int
    steps: int

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"GroupSpec name={self.name!r} must be a non-empty string")
        group_timesteps(self.tau, self.steps)


DEFAULT_GROUPS = (GroupSpec("simple", 400, 8), GroupSpec("medium", 700, 14), GroupSpec("hard", 1000, 20))
DEFAULT_THRESHOLDS = (0.95, 0.75)


def _check_thresholds(thresholds) -> tuple[float, ...]:
    try:
        thr = tuple(float(g) for g in thresholds)
    except (TypeError, ValueError):
        raise ConfigError(f"thresholds={thresholds!r} must be a sequence of numbers") from None
    if any(not 0.0 <= g <= 1.0 for g in thr) or any(a <= b for a, b in pairwise(thr)):  # () = one group
        raise ConfigError(f"thresholds={thresholds!r} must be strictly decreasing values in [0, 1] (γ1 > γ2)")
    return thr


def assign_groups(mean_conf: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Tensor:
    """Eq. (2): group index per window from its mean confidence A (any shape, any device).

    0 (simple) if A > γ1; 1 (medium) if γ2 < A ≤ γ1; 2 (hard) if A ≤ γ2 — in general, the number
    of thresholds γ_k with A ≤ γ_k. The comparison runs in `mean_conf`'s dtype (float32 0.95 is
    slightly below 0.95, so it counts as medium either way). NaN counts as hard. Returns int64."""
    thr = _check_thresholds(thresholds)
    a = mean_conf if mean_conf.is_floating_point() else mean_conf.double()
    levels = torch.tensor(thr, dtype=a.dtype, device=a.device)
    return (~(a.unsqueeze(-1) > levels)).sum(-1)


def _abar(alphas_cumprod, t: int, name: str) -> float:
    t = _int(t, name)
    if not 1 <= t <= len(alphas_cumprod):
        raise ConfigError(f"{name}={t} is outside the schedule's timesteps [1, {len(alphas_cumprod)}]")
    a = float(alphas_cumprod[t - 1])
    if not 0.0 <= a < 1.0:
        raise ConfigError(f"alphas_cumprod[{t - 1}]={a} must be in [0, 1)")
    return a


def start_latent(y0: Tensor, tau: int, alphas_cumprod: Tensor | Sequence[float], noise: Tensor) -> Tensor:
    """Eq. (6)/(7): y_τ = √ᾱ_τ y0 + √(1−ᾱ_τ) ε, in y0's dtype and device (τ 1-based)."""
    if noise.shape != y0.shape:
        raise ConfigError(f"noise shape {tuple(noise.shape)} must equal y0 shape {tuple(y0.shape)}")
    a = _abar(alphas_cumprod, tau, "tau")
    return math.sqrt(a) * y0 + math.sqrt(1.0 - a) * noise


def ddim_step(
    x_t: Tensor, x0_hat: Tensor, t: int, t_next: int, alphas_cumprod: Tensor | Sequence[float]
) -> Tensor:
    """DDIM (η = 0) from t to t_next < t given an x0 prediction:
    √ᾱ_{t'} x̂0 + √(1−ᾱ_{t'}) · (x_t − √ᾱ_t x̂0) / √(1−ᾱ_t)."""
    if _int(t_next, "t_next") >= _int(t, "t"):
        raise ConfigError(f"t_next={t_next} must be smaller than t={t}")
    a_t = _abar(alphas_cumprod, t, "t")
    a_n = _abar(alphas_cumprod, t_next, "t_next")
    eps = (x_t - math.sqrt(a_t) * x0_hat) / math.sqrt(1.0 - a_t)
    return math.sqrt(a_n) * x0_hat + math.sqrt(1.0 - a_n) * eps


def _check_window(patch, stride) -> tuple[int, int]:
    patch, stride = _int(patch, "patch"), _int(stride, "stride")
    if patch < 1:
        raise ConfigError(f"patch={patch} must be >= 1")
    if not 1 <= stride <= patch:
        raise ConfigError(f"stride={stride} must be in [1, patch={patch}] (windows must overlap or touch)")
    return patch, stride


def patch_grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of V×V windows, row-major: offsets 0, stride, 2·stride, … with the last
    row/column snapped to the border. An axis shorter than V gets the single offset 0 (the window
    reaches past it: split_patches pads the input to at least V first)."""
    patch, stride = _check_window(patch, stride)
    height, width = _int(height, "height"), _int(width, "width")
    if height < 1 or width < 1:
        raise ConfigError(f"height={height}, width={width} must be >= 1")
    return [(y, x) for y in tile_starts(height, patch, stride) for x in tile_starts(width, patch, stride)]


def _pad_to(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Pad (..., H, W) at the bottom/right to hw: reflect, or replicate where the axis is too short."""
    ph, pw = hw[0] - x.shape[-2], hw[1] - x.shape[-1]
    if ph:
        x = F.pad(x, (0, 0, 0, ph), mode="reflect" if ph < x.shape[-2] else "replicate")
    if pw:
        x = F.pad(x, (0, pw, 0, 0), mode="reflect" if pw < x.shape[-1] else "replicate")
    return x


def _crop(x: Tensor, corners: Sequence[tuple[int, int]], patch: int) -> Tensor:
    """(C, H, W) → (M, C, V, V) windows at `corners`."""
    return torch.stack([x[:, y : y + patch, c : c + patch] for y, c in corners])


def _as_chw(z: Tensor, name: str) -> Tensor:
    if z.dim() == 4 and z.shape[0] == 1:
        return z[0]
    if z.dim() != 3:
        raise ConfigError(f"{name} has shape {tuple(z.shape)}; expected (C, H, W) or (1, C, H, W)")
    return z


def split_patches(
    z: Tensor, patch: int = 16, stride: int = 12
) -> tuple[Tensor, list[tuple[int, int]], tuple[int, int]]:
    """Cut a latent (C, H, W) or (1, C, H, W) into overlapping V×V windows.

    Sides shorter than V are padded at the bottom/right to V (reflect, replicate where reflect is
    impossible). Returns (patches (M, C, V, V) in z's dtype/device, corners [(y, x)] in padded
    coordinates — equal to image coordinates — and padded_hw (max(H, V), max(W, V)))."""
    patch, stride = _check_window(patch, stride)
    x = _as_chw(z, "z")
    padded = (max(x.shape[-2], patch), max(x.shape[-1], patch))
    corners = patch_grid(*padded, patch, stride)
    return _crop(_pad_to(x, padded), corners, patch), corners, padded


def mean_confidence(
    conf: Tensor, corners: Sequence[tuple[int, int]], patch: int, padded_hw: tuple[int, int]
) -> Tensor:
    """A_i = mean of C over window i (the paper's Avg(C⟨y_0,i⟩)). conf: (1, H, W) or (1, 1, H, W),
    padded to padded_hw exactly as split_patches pads z. Returns float64 (M,) on conf's device
    (float64 so that the exact boundaries of Eq. 2 do not move with summation rounding)."""
    c = _as_chw(conf, "confidence")
    if c.shape[0] != 1:
        raise ConfigError(f"confidence has {c.shape[0]} channels; expected 1")
    if c.shape[-2] > padded_hw[0] or c.shape[-1] > padded_hw[1]:
        raise ConfigError(f"padded_hw={tuple(padded_hw)} is smaller than confidence {tuple(c.shape[-2:])}")
    return _crop(_pad_to(c.double(), tuple(padded_hw)), corners, patch).mean(dim=(1, 2, 3))


def _window_weights(kind: str, patch: int, device, dtype: torch.dtype) -> Tensor:
    if kind == "gaussian":  # the latent-tiling weights (StableSR's form): σ = 0.1·V around the centre
        return gaussian_weights(patch, patch, device=device).to(dtype)
    i = torch.arange(patch, dtype=torch.float64, device=device)
    if kind == "ramp":  # 1, 2, …, peak, …, 2, 1 — never 0, so border pixels keep a weight
        axis = torch.minimum(i + 1, patch - i)
    elif kind == "uniform":
        axis = torch.ones_like(i)
    else:
        raise ConfigError(f"weight={kind!r} is not one of {', '.join(WEIGHTS)}")
    return torch.outer(axis, axis).to(dtype)


def fuse_patches(
    patches: Tensor,
    corners: Sequence[tuple[int, int]],
    out_hw: tuple[int, int],
    patch: int,
    *,
    weight: str = "gaussian",
) -> Tensor:
    """Inverse of split_patches: weighted sum of the windows normalised by the summed weights, cropped
    to out_hw. patches: (M, C, V, V). Returns (C, H, W) in patches' dtype (accumulated in at least
    float32, in the order of `corners`, so the result is deterministic)."""
    patch = _int(patch, "patch")
    if patches.dim() != 4 or patches.shape[-2:] != (patch, patch) or patches.shape[0] != len(corners):
        raise ConfigError(
            f"patches shape {tuple(patches.shape)} must be (M={len(corners)}, C, patch={patch}, patch={patch})"
        )
    if not corners:
        raise ConfigError("corners is empty: nothing to fuse")
    acc_dtype = torch.promote_types(patches.dtype, torch.float32)
    w = _window_weights(weight, patch, patches.device, acc_dtype)
    height, width = (int(v) for v in out_hw)
    ch = max(y for y, _ in corners) + patch
    cw = max(x for _, x in corners) + patch
    if not (1 <= height <= ch and 1 <= width <= cw):
        raise ConfigError(f"out_hw={(height, width)} must lie within the windows' extent {(ch, cw)}")
    acc = patches.new_zeros((patches.shape[1], ch, cw), dtype=acc_dtype)
    wsum = patches.new_zeros((1, ch, cw), dtype=acc_dtype)
    for p, (y, x) in zip(patches, corners, strict=True):
        acc[:, y : y + patch, x : x + patch] += p * w
        wsum[:, y : y + patch, x : x + patch] += w
    wsum = wsum[:, :height, :width]
    if not bool((wsum > 0).all()):
        raise ConfigError(f"corners do not cover the output {(height, width)}")
    return (acc[:, :height, :width] / wsum).to(patches.dtype)


def theoretical_speedup(counts: Mapping[str, int], groups: Sequence[GroupSpec] = DEFAULT_GROUPS) -> float:
    """Speed-up of PGS over unified sampling of every window at N_max steps: M·N_max / Σ_g m_g·N_g,
    where N_max = the largest N in `groups` (the hard group's 20 in the paper's table)."""
    steps = {g.name: g.steps for g in groups}
    unknown = sorted(set(counts) - set(steps))
    if unknown:
        raise ConfigError(f"counts names unknown group(s) {unknown}; groups are {list(steps)}")
    if any(c < 0 for c in counts.values()):
        raise ConfigError(f"counts={dict(counts)} must be >= 0")
    work = sum(c * steps[n] for n, c in counts.items())
    if work == 0:
        raise ConfigError(f"counts={dict(counts)} holds no window: the speed-up is undefined")
    return sum(counts.values()) * max(steps.values()) / work


class _Aborted(Exception):
    """Raised in a worker when another worker failed."""


class PatchGroupSampler:
    """PGS over any x0-predicting denoiser (see the module docstring and `Denoiser`).

    groups: ordered simple → hard, one more than `thresholds` (γ1 > γ2 > …, in [0, 1]).
    patch / stride: window size V and step (stride ≤ V; stride = V means no overlap).
    weight: fusion weights, "gaussian" | "ramp" | "uniform".
    chunk_size: windows per denoiser call; each chunk of a group makes exactly N calls.
    devices: None (everything runs on y0's device) or {group name: device}; groups left out run on
    y0's device. Groups on the same device run one after another in `groups` order on one worker;
    different devices run concurrently, one thread each. Workers are keyed by the device as written
    (str(torch.device(d))), so "cpu" and "cpu:0" are two workers on the same CPU."""

    def __init__(
        self,
        *,
        groups: Sequence[GroupSpec] = DEFAULT_GROUPS,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        patch: int = 16,
        stride: int = 12,
        weight: str = "gaussian",
        chunk_size: int = 64,
        devices: Mapping[str, str | torch.device] | None = None,
    ):
        groups = tuple(groups)
        if not groups or not all(isinstance(g, GroupSpec) for g in groups):
            raise ConfigError(f"groups={groups!r} must be a non-empty sequence of GroupSpec")
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"groups have duplicate names {names}")
        thr = _check_thresholds(thresholds)
        if len(thr) != len(groups) - 1:
            raise ConfigError(
                f"thresholds={thresholds!r} must hold len(groups) - 1 = {len(groups) - 1} values"
            )
        self.patch, self.stride = _check_window(patch, stride)
        if weight not in WEIGHTS:
            raise ConfigError(f"weight={weight!r} is not one of {', '.join(WEIGHTS)}")
        chunk_size = _int(chunk_size, "chunk_size")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
        placed: dict[str, torch.device] = {}
        if devices is not None:
            if not isinstance(devices, Mapping):
                raise ConfigError(f"devices={devices!r} must be None or a mapping {{group name: device}}")
            unknown = sorted(set(devices) - set(names))
            if unknown:
                raise ConfigError(f"devices names unknown group(s) {unknown}; groups are {names}")
            placed = {name: resolve_device(dev) for name, dev in devices.items()}
        self.groups = groups
        self.thresholds = thr
        self.weight = weight
        self.chunk_size = chunk_size
        self.devices = placed
        self.timesteps = {g.name: group_timesteps(g.tau, g.steps) for g in groups}

    def __call__(
        self,
        denoiser: Denoiser | Mapping[str, Denoiser],
        y0: Tensor,
        confidence: Tensor,
        alphas_cumprod: Tensor | Sequence[float],
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[Tensor, dict]:
        """Sample x̂0 (1, C, H, W) (y0's dtype and device) from the coarse latent y0 (1, C, H, W) and
        the confidence map (1, 1, H, W) in [0, 1], under the schedule alphas_cumprod (T,).

        denoiser: one callable used on every device, or {device string: callable} (one model copy per
        device). Noise: `noise` of the padded latent's shape (1, C, max(H, V), max(W, V)) — or of y0's
        shape, then padded like y0 — else drawn from `generator` (a CPU generator) in float32.
        progress(dict) runs after every denoiser call with group, step, steps, t, done_calls,
        total_calls (from worker threads, one call at a time). Returns (x0, stats)."""
        if not isinstance(y0, Tensor) or y0.dim() != 4 or y0.shape[0] != 1 or not y0.is_floating_point():
            raise ConfigError(f"y0 must be a float tensor (1, C, H, W); got {getattr(y0, 'shape', type(y0))}")
        height, width = y0.shape[-2:]
        conf = confidence.reshape(-1, *confidence.shape[-2:]) if isinstance(confidence, Tensor) else None
        if conf is None or conf.shape != (1, height, width):
            raise ConfigError(
                f"confidence must be (1, 1, {height}, {width}) like y0; got {getattr(confidence, 'shape', None)}"
            )
        lo, hi = float(conf.min()), float(conf.max())
        if not 0.0 <= lo <= hi <= 1.0:  # also false for NaN
            raise ConfigError(f"confidence values must lie in [0, 1]; found [{lo}, {hi}]")
        abar = self._schedule(alphas_cumprod)
        home = y0.device

        y0p, corners, padded = split_patches(y0, self.patch, self.stride)
        eps = self._noise(noise, generator, y0[0], padded).to(home, y0.dtype)
        epsp = _crop(eps, corners, self.patch)
        conf_mean = mean_confidence(conf.to(home), corners, self.patch, padded)
        assignment = assign_groups(conf_mean, self.thresholds)

        # Worker plan: {device string: (device, [(group, window indices)])} in groups order.
        plan: dict[str, tuple[torch.device, list[tuple[GroupSpec, Tensor]]]] = {}
        counts = {}
        for k, g in enumerate(self.groups):
            idx = torch.nonzero(assignment == k).flatten()
            counts[g.name] = len(idx)
            if len(idx):
                dev = self.devices.get(g.name, home)
                plan.setdefault(str(dev), (dev, []))[1].append((g, idx))
        fns = {key: self._denoiser_for(denoiser, key) for key in plan}
        total_calls = sum(
            g.steps * -(-len(idx) // self.chunk_size) for _, jobs in plan.values() for g, idx in jobs
        )

        lock, abort, done = threading.Lock(), threading.Event(), [0]
        if progress is not None:  # before the first call, so a progress bar shows from the start
            progress(
                {"group": None, "step": 0, "steps": 0, "t": None, "done_calls": 0, "total_calls": total_calls}
            )

        def report(g: GroupSpec, step: int, t: int) -> None:
            with lock:
                done[0] += 1
                if progress is not None:
                    progress(
                        {
                            "group": g.name,
                            "step": step,
                            "steps": g.steps,
                            "t": t,
                            "done_calls": done[0],
                            "total_calls": total_calls,
                        }
                    )

        def work(key: str) -> list[tuple[Tensor, Tensor]]:
            dev, jobs = plan[key]
            try:
                with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
                    return [
                        (
                            idx,
                            self._sample_group(
                                fns[key], g, dev, y0p[idx], epsp[idx], idx, abar, report, abort
                            ),
                        )
                        for g, idx in jobs
                    ]
            except BaseException:
                abort.set()
                raise

        if len(plan) == 1:
            results = work(next(iter(plan)))
        else:  # one thread per device, so a fast worker never picks up another device's groups
            done_by: dict[str, list[tuple[Tensor, Tensor]]] = {}
            errors: list[BaseException] = []

            def run(key: str) -> None:
                try:
                    done_by[key] = work(key)
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(key,), name=f"pgs-{key}") for key in plan]
            try:
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
            except BaseException:  # e.g. KeyboardInterrupt while waiting: stop the workers too
                abort.set()
                raise
            first = next((e for e in errors if not isinstance(e, _Aborted)), None)
            if first is not None:
                raise first
            results = [r for key in plan for r in done_by[key]]

        out = torch.empty_like(y0p)
        for idx, x0 in results:
            out[idx] = x0.to(home, out.dtype)
        x0 = fuse_patches(out, corners, (height, width), self.patch, weight=self.weight).unsqueeze(0)

        m = len(corners)
        stats = {
            "patches": m,
            "groups": counts,
            "denoiser_calls": done[0],
            "patch_evaluations": sum(counts[g.name] * g.steps for g in self.groups),
            "unified_patch_evaluations": m * max(g.steps for g in self.groups),
            "speedup": theoretical_speedup(counts, self.groups),
            "mean_confidence": {
                "min": float(conf_mean.min()),
                "mean": float(conf_mean.mean()),
                "max": float(conf_mean.max()),
            },
            "workers": {key: [g.name for g, _ in jobs] for key, (_, jobs) in plan.items()},
        }
        return x0, stats

    @torch.no_grad()
    def _sample_group(
        self,
        fn: Denoiser,
        g: GroupSpec,
        dev: torch.device,
        y0p: Tensor,
        epsp: Tensor,
        idx: Tensor,
        abar: list[float],
        report: Callable[[GroupSpec, int, int], None],
        abort: threading.Event,
    ) -> Tensor:
        """One group's windows on `dev`, chunk by chunk; each chunk makes exactly N calls."""
        ts = self.timesteps[g.name]
        y0p, epsp, idx = y0p.to(dev), epsp.to(dev), idx.to(dev)
        outs = []
        for s in range(0, len(idx), self.chunk_size):
            y_c, i_c = y0p[s : s + self.chunk_size], idx[s : s + self.chunk_size]
            x = start_latent(y_c, g.tau, abar, epsp[s : s + self.chunk_size])
            for k, t in enumerate(ts):
                if abort.is_set():
                    raise _Aborted
                x0_hat = fn(x, torch.full((len(i_c),), t, dtype=torch.long, device=dev), y_c, i_c)
                if not isinstance(x0_hat, Tensor) or x0_hat.shape != x.shape:
                    raise ConfigError(
                        f"denoiser returned {getattr(x0_hat, 'shape', type(x0_hat))} for input "
                        f"{tuple(x.shape)}; it must return x̂0 of the input's shape"
                    )
                report(g, k + 1, t)
                if k + 1 < len(ts):
                    x = ddim_step(x, x0_hat, t, ts[k + 1], abar)
            outs.append(x0_hat)  # the x̂0 of the call at t = 1 (D7): no step after it
        return torch.cat(outs)

    def _schedule(self, alphas_cumprod) -> list[float]:
        ac = torch.as_tensor(alphas_cumprod).detach()
        if ac.dim() != 1:
            raise ConfigError(f"alphas_cumprod must be 1-D (T,); got shape {tuple(ac.shape)}")
        tau_max = max(g.tau for g in self.groups)
        if len(ac) < tau_max:
            raise ConfigError(f"alphas_cumprod has T={len(ac)} entries; the groups need tau up to {tau_max}")
        values = ac.double().cpu().tolist()
        if not all(0.0 <= a < 1.0 for a in values):
            raise ConfigError("alphas_cumprod values must lie in [0, 1)")
        return values

    def _noise(self, noise, generator, y: Tensor, padded: tuple[int, int]) -> Tensor:
        """One global noise map (C, Hp, Wp) for the padded latent; windows crop it."""
        shape = (y.shape[0], *padded)
        if noise is None:
            if generator is not None and generator.device.type != "cpu":
                raise ConfigError(
                    f"generator is on {generator.device}; pass a CPU torch.Generator (the noise is drawn on "
                    "the CPU so results do not depend on the device)"
                )
            return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0]
        if generator is not None:
            raise ConfigError("pass either noise or generator, not both")
        n = noise[0] if isinstance(noise, Tensor) and noise.dim() == 4 and noise.shape[0] == 1 else noise
        if isinstance(n, Tensor) and n.shape == shape:
            return n
        if isinstance(n, Tensor) and n.shape == y.shape:
            return _pad_to(n, padded)
        raise ConfigError(
            f"noise has shape {getattr(noise, 'shape', type(noise))}; expected (1, {shape[0]}, {padded[0]}, "
            f"{padded[1]}) (the padded latent) or y0's shape"
        )

    @staticmethod
    def _denoiser_for(denoiser, key: str) -> Denoiser:
        if isinstance(denoiser, Mapping):
            try:
                table = {str(torch.device(k)): v for k, v in denoiser.items()}
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"denoiser mapping keys {list(denoiser)} must be device strings") from e
            if key not in table:
                raise ConfigError(f"denoiser mapping has no entry for device {key!r} (keys: {list(table)})")
            denoiser = table[key]
        if not callable(denoiser):
            raise ConfigError(f"denoiser={denoiser!r} is not callable")
        return denoiser
