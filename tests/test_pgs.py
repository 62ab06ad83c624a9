"""Patch-adaptive Group Sampling (PatchScaler §3.2): grouping, shortcut start, timesteps, DDIM steps,
windows and fusion, call accounting, oracle exactness, devices/chunking/noise independence."""

from __future__ import annotations

import math
import threading
from itertools import pairwise

import pytest
import torch
from torch import nn

from diffsr.errors import ConfigError
from diffsr.methods.patchscaler.pgs import (
    DEFAULT_GROUPS,
    DEFAULT_THRESHOLDS,
    WEIGHTS,
    GroupSpec,
    PatchGroupSampler,
    assign_groups,
    ddim_step,
    fuse_patches,
    group_timesteps,
    mean_confidence,
    patch_grid,
    split_patches,
    start_latent,
    theoretical_speedup,
)

T = 1000


def linear_betas() -> list[float]:
    """DiT / ADM linear schedule, 1e-4 → 0.02 over 1000 steps."""
    return [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]


def scaled_linear_betas() -> list[float]:
    """Stable Diffusion's scaled-linear schedule: linspace(√0.00085, √0.012)²."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    return [(a + (b - a) * i / (T - 1)) ** 2 for i in range(T)]


def abar_of(betas) -> torch.Tensor:
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


ABAR = abar_of(linear_betas())


def block_confidence(values, rows, cols, patch):
    """(1, 1, rows·V, cols·V) map whose V×V blocks hold `values` (row-major) as float32."""
    v = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    return v.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None, None]


def smooth_denoiser(x, t, y0, idx):
    """Elementwise, t-dependent stand-in for a network (so chunking cannot change rounding)."""
    return torch.tanh(x) * 0.3 + y0 * (0.5 + t.view(-1, 1, 1, 1) / 2000)


# ---------------------------------------------------------------- grouping (Eq. 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_groups_exact_boundaries(dtype):
    a = torch.tensor([0.95, 0.9500001, 0.75, 0.7500001, 0.0, 1.0, 0.5, 0.99], dtype=dtype)
    assert assign_groups(a).tolist() == [1, 0, 2, 1, 2, 0, 2, 0]
    assert assign_groups(a).dtype == torch.long


@pytest.mark.parametrize(
    ("value", "group"), [(0.95, 1), (0.9500001, 0), (0.75, 2), (0.7500001, 1), (0.0, 2), (1.0, 0)]
)
def test_window_mean_keeps_the_boundaries(value, group):
    conf = torch.full((1, 1, 37, 53), value, dtype=torch.float32)
    _, corners, padded = split_patches(torch.zeros(4, 37, 53))
    mean = mean_confidence(conf, corners, 16, padded)
    assert mean.dtype == torch.float64 and len(mean) == len(corners)
    assert assign_groups(mean).tolist() == [group] * len(corners)


def test_assign_groups_other_thresholds_and_nan():
    a = torch.tensor([0.9, 0.6, 0.3, 0.1, float("nan")])
    assert assign_groups(a, (0.8, 0.5, 0.2)).tolist() == [0, 1, 2, 3, 3]
    assert assign_groups(a[:4], ()).tolist() == [0, 0, 0, 0]  # no thresholds: one group (unified sampling)
    for bad in [(0.75, 0.95), (0.95, 0.95), (1.2, 0.5), (0.5, -0.1)]:
        with pytest.raises(ConfigError, match="thresholds"):
            assign_groups(a, bad)


# ---------------------------------------------------------------- shortcut start and DDIM step


@pytest.mark.parametrize(
    "betas", [linear_betas(), scaled_linear_betas()], ids=["dit-linear", "sd-scaled-linear"]
)
@pytest.mark.parametrize("group", DEFAULT_GROUPS, ids=lambda g: g.name)
def test_start_latent_matches_hand_computation(betas, group):
    g = torch.Generator().manual_seed(group.tau)
    y0, eps = torch.randn(5, 4, 16, 16, generator=g), torch.randn(5, 4, 16, 16, generator=g)
    abar_tau = math.prod(1 - b for b in betas[: group.tau])  # ᾱ_τ = Π_{s=1..τ} α_s
    expect = math.sqrt(abar_tau) * y0.double() + math.sqrt(1 - abar_tau) * eps.double()
    got = start_latent(y0, group.tau, abar_of(betas), eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6)


def test_schedule_values_quoted_in_the_notes():
    """PATCHSCALER.md D5: √ᾱ_τ at τ = 400/700/1000."""
    lin = [math.sqrt(ABAR[t - 1]) for t in (400, 700, 1000)]
    sd = [math.sqrt(abar_of(scaled_linear_betas())[t - 1]) for t in (400, 700, 1000)]
    assert lin == pytest.approx([0.442, 0.084, 0.006], abs=1e-3)
    assert sd == pytest.approx([0.653, 0.288, 0.068], abs=1e-3)


def test_ddim_step_formula_and_trajectory_consistency():
    g = torch.Generator().manual_seed(0)
    x0, eps, x_t = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t, t_next = 700, 646
    a, an = ABAR[t - 1].item(), ABAR[t_next - 1].item()
    expect = math.sqrt(an) * x0 + math.sqrt(1 - an) * (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    torch.testing.assert_close(ddim_step(x_t, x0, t, t_next, ABAR), expect, rtol=0, atol=1e-12)
    # On the trajectory of (x0, ε), η = 0 DDIM with the true x0 stays on it.
    on = start_latent(x0, t, ABAR, eps)
    torch.testing.assert_close(ddim_step(on, x0, t, t_next, ABAR), start_latent(x0, t_next, ABAR, eps))
    with pytest.raises(ConfigError, match="t_next"):
        ddim_step(x_t, x0, 5, 5, ABAR)
    with pytest.raises(ConfigError, match="t=1001"):
        ddim_step(x_t, x0, 1001, 5, ABAR)


# ---------------------------------------------------------------- timesteps


def test_default_group_timesteps():
    assert group_timesteps(400, 8) == [400, 343, 286, 229, 172, 115, 58, 1]
    for g in DEFAULT_GROUPS:
        ts = group_timesteps(g.tau, g.steps)
        assert len(ts) == g.steps and len(set(ts)) == g.steps
        assert ts[0] == g.tau and ts[-1] == 1
        assert all(a > b for a, b in pairwise(ts))


def test_group_timesteps_edge_cases():
    assert group_timesteps(400, 1) == [400]
    assert group_timesteps(1, 1) == [1]
    assert group_timesteps(400, 2) == [400, 1]
    assert group_timesteps(7, 7) == [7, 6, 5, 4, 3, 2, 1]
    for tau in range(1, 41):
        for steps in range(1, tau + 1):
            ts = group_timesteps(tau, steps)
            assert len(ts) == steps and ts[0] == tau and ts[-1] == (1 if steps > 1 else tau)
            assert all(a > b for a, b in pairwise(ts))
            if steps > 1:  # each value is the nearest integer to linspace(τ, 1, N)
                exact = [tau + (1 - tau) * i / (steps - 1) for i in range(steps)]
                assert all(abs(a - b) <= 0.5 for a, b in zip(ts, exact, strict=True))
    for tau, steps in [(10, 11), (10, 0), (0, 1), (5, -1)]:
        with pytest.raises(ConfigError, match="steps|tau"):
            group_timesteps(tau, steps)
    with pytest.raises(ConfigError, match="steps"):
        GroupSpec("x", 10, 20)


# ---------------------------------------------------------------- windows and fusion


def test_patch_grid_counts_and_snapping():
    assert len(patch_grid(64, 64, 16, 12)) == 25  # LR 128 → latent 64 (D13)
    assert len(patch_grid(256, 256, 16, 12)) == 441  # 512 → 2048
    assert len(patch_grid(64, 64, 16, 16)) == 16
    assert sorted({y for y, _ in patch_grid(37, 53, 16, 12)}) == [0, 12, 21]
    assert sorted({x for _, x in patch_grid(37, 53, 16, 12)}) == [0, 12, 24, 36, 37]
    assert patch_grid(7, 9, 16, 12) == [(0, 0)]
    for stride in (0, 17):
        with pytest.raises(ConfigError, match="stride"):
            patch_grid(64, 64, 16, stride)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("shape", [(4, 7, 9), (4, 16, 16), (4, 37, 53), (4, 17, 100), (1, 1, 1)])
@pytest.mark.parametrize("stride", [12, 16, 5])
def test_split_fuse_round_trip(shape, weight, stride):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    patches, corners, padded = split_patches(z, 16, stride)
    assert padded == (max(shape[1], 16), max(shape[2], 16))
    assert patches.shape == (len(corners), shape[0], 16, 16)
    out = fuse_patches(patches, corners, shape[1:], 16, weight=weight)
    assert out.shape == shape and out.dtype == z.dtype
    torch.testing.assert_close(out, z, rtol=1e-6, atol=1e-6)


def test_split_pads_reflect_or_replicate():
    z = torch.arange(10 * 20, dtype=torch.float32).reshape(1, 10, 20)
    patches, corners, padded = split_patches(z, 16, 12)  # 6 rows to add < 10: reflect
    assert padded == (16, 20) and corners == [(0, 0), (0, 4)]
    assert torch.equal(patches[0, 0, 10:, :], z[0, [8, 7, 6, 5, 4, 3], :16])
    small = torch.arange(7 * 9, dtype=torch.float32).reshape(1, 1, 7, 9)
    patches, _, _ = split_patches(
        small, 16, 12
    )  # per axis: 9 rows to add ≥ 7 → replicate; 7 cols < 9 → reflect
    assert torch.equal(patches[0, 0, 7:, :9], small[0, 0, 6:7].expand(9, 9))
    assert torch.equal(patches[0, 0, :7, 9:], small[0, 0, :, [7, 6, 5, 4, 3, 2, 1]])
    # The confidence map is padded the same way.
    _, corners, padded = split_patches(torch.zeros(4, 7, 9))
    assert mean_confidence(small, corners, 16, padded).item() == pytest.approx(
        patches[0].double().mean().item()
    )


def test_fuse_rejects_bad_input():
    patches, corners, _ = split_patches(torch.zeros(4, 20, 20))
    with pytest.raises(ConfigError, match="weight"):
        fuse_patches(patches, corners, (20, 20), 16, weight="cosine")
    with pytest.raises(ConfigError, match="patches shape"):
        fuse_patches(patches[:1], corners, (20, 20), 16)
    with pytest.raises(ConfigError, match="out_hw"):
        fuse_patches(patches, corners, (21, 20), 16)


# ---------------------------------------------------------------- the sampler: call accounting


class Recorder:
    """Counting stub: logs (t values, idx values, thread) of every call."""

    def __init__(self, fn=smooth_denoiser):
        self.fn, self.calls, self.lock = fn, [], threading.Lock()

    def __call__(self, x, t, y0, idx):
        with self.lock:
            self.calls.append((t.tolist(), idx.tolist(), threading.current_thread()))
        return self.fn(x, t, y0, idx)


# 3×2 non-overlapping windows (stride = V): 1 simple, 2 medium, 3 hard.
MIXED = [1.0, 0.9, 0.9, 0.5, 0.5, 0.5]
GROUP_OF = {0: "simple", 1: "medium", 2: "medium", 3: "hard", 4: "hard", 5: "hard"}
GROUP_OF_T = {400: "simple", 700: "medium", 1000: "hard"}  # each default group's first timestep


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_call_counts_and_timesteps_per_group(chunk):
    conf = block_confidence(MIXED, 3, 2, 16)
    y0 = torch.randn(1, 4, 48, 32, generator=torch.Generator().manual_seed(0))
    stub, events = Recorder(), []
    sampler = PatchGroupSampler(stride=16, chunk_size=chunk)
    _, stats = sampler(
        stub, y0, conf, ABAR, generator=torch.Generator().manual_seed(0), progress=events.append
    )

    members = {"simple": [0], "medium": [1, 2], "hard": [3, 4, 5]}
    steps = {g.name: g.steps for g in DEFAULT_GROUPS}
    expect_calls = sum(steps[n] * math.ceil(len(m) / chunk) for n, m in members.items())
    assert stats["denoiser_calls"] == len(stub.calls) == expect_calls
    assert stats["groups"] == {"simple": 1, "medium": 2, "hard": 3}
    assert stats["patches"] == 6
    assert stats["patch_evaluations"] == 1 * 8 + 2 * 14 + 3 * 20
    assert stats["unified_patch_evaluations"] == 6 * 20
    assert stats["speedup"] == pytest.approx(120 / 96)
    assert stats["speedup"] == theoretical_speedup(stats["groups"], DEFAULT_GROUPS)

    seen: dict[tuple, list[int]] = {}
    for ts, idx, _ in stub.calls:
        assert len(set(ts)) == 1 and len(idx) <= chunk
        assert {GROUP_OF[i] for i in idx} == {GROUP_OF[idx[0]]}  # a call never mixes groups
        seen.setdefault(tuple(idx), []).append(ts[0])
    for idx, ts in seen.items():
        g = next(g for g in DEFAULT_GROUPS if g.name == GROUP_OF[idx[0]])
        assert ts == group_timesteps(g.tau, g.steps)
    assert sorted(i for idx in seen for i in idx) == list(range(6))

    start, *events = events  # one event before the first call, so a progress bar shows from the start
    assert (start["done_calls"], start["total_calls"], start["group"]) == (0, expect_calls, None)
    assert [e["done_calls"] for e in events] == list(range(1, expect_calls + 1))
    assert {e["total_calls"] for e in events} == {expect_calls}
    assert all(e["steps"] == steps[e["group"]] and 1 <= e["step"] <= e["steps"] for e in events)


def test_empty_group_makes_no_call():
    conf = block_confidence([0.9, 0.9, 0.5, 0.5, 0.5, 0.5], 3, 2, 16)
    stub = Recorder()
    _, stats = PatchGroupSampler(stride=16)(stub, torch.zeros(1, 4, 48, 32), conf, ABAR)
    assert stats["groups"] == {"simple": 0, "medium": 2, "hard": 4}
    assert stats["denoiser_calls"] == len(stub.calls) == 14 + 20
    assert 400 not in {t for ts, _, _ in stub.calls for t in ts}


def test_sampler_math_matches_hand_replay():
    """Start point, every DDIM step and the final x̂0 (call at t = 1), replayed in float64."""
    conf = block_confidence(MIXED, 3, 2, 16)
    gen = torch.Generator().manual_seed(3)
    y0, noise = torch.randn(1, 4, 48, 32, generator=gen), torch.randn(1, 4, 48, 32, generator=gen)
    out, _ = PatchGroupSampler(stride=16)(smooth_denoiser, y0, conf, ABAR, noise=noise)

    expect = torch.empty(1, 4, 48, 32, dtype=torch.float64)
    for i, (y, x) in enumerate(patch_grid(48, 32, 16, 16)):
        g = next(g for g in DEFAULT_GROUPS if g.name == GROUP_OF[i])
        yp, ep = (v[..., y : y + 16, x : x + 16].double() for v in (y0, noise))
        ts = group_timesteps(g.tau, g.steps)
        a = ABAR[g.tau - 1].item()
        xt = math.sqrt(a) * yp + math.sqrt(1 - a) * ep
        for k, t in enumerate(ts):
            x0 = smooth_denoiser(xt, torch.tensor([t]), yp, None)
            if k + 1 < len(ts):
                a, an = ABAR[t - 1].item(), ABAR[ts[k + 1] - 1].item()
                xt = math.sqrt(an) * x0 + math.sqrt(1 - an) * (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
        expect[..., y : y + 16, x : x + 16] = x0
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the sampler: oracle exactness


def oracle_for(x0, patch, stride):
    target, _, _ = split_patches(x0, patch, stride)
    return lambda x, t, y0, idx: target[idx]


@pytest.mark.parametrize(
    "groups",
    [
        DEFAULT_GROUPS,
        (GroupSpec("simple", 1, 1), GroupSpec("medium", 50, 7), GroupSpec("hard", 1000, 1)),
        (GroupSpec("simple", 999, 2), GroupSpec("medium", 10, 10), GroupSpec("hard", 300, 300)),
    ],
    ids=["paper", "n1", "mixed"],
)
@pytest.mark.parametrize("conf_kind", ["random", "ones", "zeros"])
@pytest.mark.parametrize("shape", [(37, 53), (9, 13)])
def test_oracle_denoiser_reproduces_target(groups, conf_kind, shape):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, *shape, generator=gen)
    y0 = x0 + 0.3 * torch.randn(1, 4, *shape, generator=gen)
    conf = {
        "random": lambda: torch.rand(1, 1, *shape, generator=gen) ** 0.3,
        "ones": lambda: torch.ones(1, 1, *shape),
        "zeros": lambda: torch.zeros(1, 1, *shape),
    }[conf_kind]()
    out, stats = PatchGroupSampler(groups=groups)(oracle_for(x0, 16, 12), y0, conf, ABAR, generator=gen)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    if conf_kind == "ones":
        assert stats["groups"]["simple"] == stats["patches"]
    if conf_kind == "zeros":
        assert stats["groups"]["hard"] == stats["patches"]
        assert stats["patch_evaluations"] == stats["patches"] * groups[-1].steps


# ---------------------------------------------------------------- devices, chunking, noise


def mixed_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    y0 = torch.randn(1, 4, 37, 53, generator=gen)
    # Column bands: windows at x = 0, 12 → hard; 24 → medium; 36, 37 → simple.
    conf = torch.full((1, 1, 37, 53), 0.3)
    conf[..., 20:] = 0.85
    conf[..., 40:] = 1.0
    return y0, conf


def test_two_workers_bitwise_equal_to_one_device():
    y0, conf = mixed_inputs()
    plain, plain_stats = PatchGroupSampler()(
        smooth_denoiser, y0, conf, ABAR, generator=torch.Generator().manual_seed(7)
    )
    assert all(plain_stats["groups"].values()), plain_stats["groups"]  # all three groups non-empty

    split = {"hard": "cpu:0", "simple": "cpu:1", "medium": "cpu:1"}  # the paper's 2-GPU split, on CPU
    stub = Recorder()
    out, stats = PatchGroupSampler(devices=split)(
        stub, y0, conf, ABAR, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(out, plain)
    assert stats["workers"] == {"cpu:1": ["simple", "medium"], "cpu:0": ["hard"]}
    assert stats["denoiser_calls"] == plain_stats["denoiser_calls"]
    threads = {GROUP_OF_T[ts[0]]: th for ts, _, th in stub.calls if ts[0] in GROUP_OF_T}
    assert threads["simple"] is threads["medium"] is not threads["hard"]
    assert threading.main_thread() not in threads.values()

    # One model copy per device.
    copies = {"cpu:0": Recorder(), "cpu:1": Recorder()}
    out2, _ = PatchGroupSampler(devices=split)(
        copies, y0, conf, ABAR, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(out2, plain)
    assert {ts[0] for ts, _, _ in copies["cpu:0"].calls} == set(group_timesteps(1000, 20))
    assert {ts[0] for ts, _, _ in copies["cpu:1"].calls} == set(
        group_timesteps(400, 8) + group_timesteps(700, 14)
    )
    with pytest.raises(ConfigError, match="no entry for device 'cpu:0'"):
        PatchGroupSampler(devices=split)({"cpu:1": smooth_denoiser}, y0, conf, ABAR)


def test_worker_failure_propagates():
    y0, conf = mixed_inputs()

    def broken(x, t, y, idx):
        if t[0] == 1000:
            raise RuntimeError("boom on hard")
        return smooth_denoiser(x, t, y, idx)

    with pytest.raises(RuntimeError, match="boom on hard"):
        PatchGroupSampler(devices={"hard": "cpu:0"})(broken, y0, conf, ABAR)


def test_chunk_size_does_not_change_the_result():
    y0, conf = mixed_inputs(1)
    outs = [
        PatchGroupSampler(chunk_size=c)(
            smooth_denoiser, y0, conf, ABAR, generator=torch.Generator().manual_seed(2)
        )[0]
        for c in (1, 3, 64)
    ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_generator_and_noise_reproducibility():
    y0, conf = mixed_inputs(2)
    sampler = PatchGroupSampler()
    run = lambda **kw: sampler(smooth_denoiser, y0, conf, ABAR, **kw)[0]  # noqa: E731
    a = run(generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, run(generator=torch.Generator().manual_seed(11)))
    assert not torch.equal(a, run(generator=torch.Generator().manual_seed(12)))
    # The global map is drawn on the CPU in float32, padded-latent shaped: passing it gives the same result.
    noise = torch.randn(1, 4, 37, 53, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, run(noise=noise))

    small = y0[..., :9, :13]
    b = sampler(smooth_denoiser, small, conf[..., :9, :13], ABAR, generator=torch.Generator().manual_seed(3))[
        0
    ]
    padded_noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, sampler(smooth_denoiser, small, conf[..., :9, :13], ABAR, noise=padded_noise)[0])
    with pytest.raises(ConfigError, match="noise"):
        sampler(smooth_denoiser, small, conf[..., :9, :13], ABAR, noise=torch.zeros(1, 4, 10, 10))


def test_generic_conv_denoiser_stablesr_style():
    """The plug-in use (§4.3, D16): V = 64 windows on a 64×96 latent, SD's schedule, any callable."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 3, padding=1))
    denoiser = lambda x, t, y0, idx: y0 + 0.1 * net(torch.cat([x, y0], 1))  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(1, 4, 64, 96, generator=gen)
    conf = torch.ones(1, 1, 64, 96)
    conf[..., 48:] = 0.5  # window x=0 → mean 0.875 (medium), window x=32 → 0.625 (hard)
    abar = abar_of(scaled_linear_betas()).float()
    sampler = PatchGroupSampler(patch=64, stride=48, chunk_size=1)
    out, stats = sampler(denoiser, y0, conf, abar, generator=torch.Generator().manual_seed(1))
    assert out.shape == y0.shape and torch.isfinite(out).all()
    assert stats["patches"] == 2 and stats["groups"] == {"simple": 0, "medium": 1, "hard": 1}
    assert stats["mean_confidence"]["min"] == pytest.approx(0.625)
    assert stats["denoiser_calls"] == 14 + 20
    assert not out.requires_grad  # the sampler runs under no_grad, in every worker
    batched, _ = PatchGroupSampler(patch=64, stride=48)(
        denoiser, y0, conf, abar, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(batched, out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- validation


def test_theoretical_speedup():
    assert theoretical_speedup({"simple": 10, "medium": 5, "hard": 5}) == pytest.approx(20 * 20 / 250)
    assert theoretical_speedup({"hard": 7}) == 1.0
    with pytest.raises(ConfigError, match="unknown"):
        theoretical_speedup({"easy": 1})
    with pytest.raises(ConfigError, match="no window"):
        theoretical_speedup({"simple": 0})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"thresholds": (0.75, 0.95)}, "thresholds"),
        ({"thresholds": (0.9,)}, "thresholds"),
        ({"stride": 0}, "stride"),
        ({"stride": 17}, "stride"),
        ({"weight": "cosine"}, "weight"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"devices": {"hardest": "cpu"}}, "hardest"),
        ({"devices": {"hard": "nonsense"}}, "device"),
        ({"groups": (GroupSpec("a", 10, 2), GroupSpec("a", 20, 2), GroupSpec("b", 30, 2))}, "duplicate"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PatchGroupSampler(**kwargs)


def test_call_validation():
    y0, conf = mixed_inputs()
    s = PatchGroupSampler()
    with pytest.raises(ConfigError, match="alphas_cumprod"):
        s(smooth_denoiser, y0, conf, ABAR[:999])
    with pytest.raises(ConfigError, match="confidence"):
        s(smooth_denoiser, y0, conf * 2, ABAR)
    with pytest.raises(ConfigError, match="confidence"):
        s(smooth_denoiser, y0, conf[..., :-1], ABAR)
    with pytest.raises(ConfigError, match="y0"):
        s(smooth_denoiser, y0.expand(2, -1, -1, -1), conf, ABAR)
    with pytest.raises(ConfigError, match="denoiser returned"):
        s(lambda x, t, y, i: x[:, :3], y0, conf, ABAR)
    with pytest.raises(ConfigError, match="noise or generator"):
        s(smooth_denoiser, y0, conf, ABAR, noise=torch.zeros_like(y0), generator=torch.Generator())
    assert DEFAULT_THRESHOLDS == (0.95, 0.75)
