"""PatchScaler's GRM (shapes, residual, confidence-driven loss and its optimum, calibration, grouping,
a tiny GRM whose confidence follows its error) and Patch-DiT (shapes, adaLN-Zero / g(t) identity at
init, prompt cache: exactness, slicing, K/V computed once; overfitting; DDPM loss; ᾱ schedules)."""

from __future__ import annotations

import math

import pytest
import torch

from diffsr.errors import ConfigError
from diffsr.methods.patchscaler.dit import (
    PRESETS,
    PatchDiT,
    PatchDiTConfig,
    PromptCache,
    diffusion_loss,
    linear_alphas_cumprod,
    scaled_linear_alphas_cumprod,
)
from diffsr.methods.patchscaler.grm import (
    GlobalRestorationModule,
    calibrate_eta,
    grm_loss,
    group_fractions,
    optimal_confidence,
    window_means,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These small models and training loops run several times faster on one thread when other processes
    share the 2 cores (OpenMP workers spin-wait for a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_grm(attention: str = "mdta", seed: int = 0, blocks: int = 1) -> GlobalRestorationModule:
    torch.manual_seed(seed)
    return GlobalRestorationModule(4, widths=(8, 16, 32), blocks=blocks, heads=(1, 2, 4), attention=attention)


def tiny_dit(seed: int = 0) -> PatchDiT:
    torch.manual_seed(seed)
    return PatchDiT(PRESETS["tiny"])


def randomise(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Non-zero values for every parameter, including the zero-initialised gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# ----------------------------------------------------------------------------------------- GRM


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (16, 16), (33, 20), (2, 5)])
@pytest.mark.parametrize("attention", ["mdta", "bottleneck"])
def test_grm_shapes_any_size(size, attention):
    grm = tiny_grm(attention)
    y_lr = torch.randn(2, 4, *size)
    y_hr, conf = grm(y_lr)
    assert y_hr.shape == (2, 4, *size) and conf.shape == (2, 1, *size)
    assert bool(((conf > 0) & (conf < 1)).all())
    assert torch.equal(y_hr, y_lr)  # Δ head starts at zero: an untrained GRM passes y_LR through


def test_grm_output_is_input_plus_residual_head():
    grm = randomise(tiny_grm(), std=0.05)
    seen = {}
    grm.delta_head.register_forward_hook(lambda m, i, o: seen.__setitem__("delta", o))
    y_lr = torch.randn(1, 4, 9, 14)
    y_hr, _ = grm(y_lr)
    delta = seen["delta"][..., :9, :14]  # the head runs on the padded map; outputs are cropped back
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(y_hr - y_lr, delta, rtol=0, atol=1e-6)


def test_grm_bottleneck_attention_reaches_the_far_corner():
    y = torch.randn(1, 4, 96, 96)
    y2 = y.clone()
    y2[..., 0, 0] += 5.0
    changes = {}
    for attention in ("none", "bottleneck"):
        grm = randomise(tiny_grm(attention), std=0.05)
        with torch.no_grad():
            a, ca = grm(y)
            b, cb = grm(y2)
        changes[attention] = (a - b)[..., -8:, -8:].abs().max().item()
    assert changes["none"] == 0.0  # convolutions alone do not see 90 pixels away
    assert changes["bottleneck"] > 1e-6  # the transposed attention does


def test_grm_rejects_bad_config_and_input():
    with pytest.raises(ConfigError):
        GlobalRestorationModule(widths=(8, 16), heads=(1, 2, 4))
    with pytest.raises(ConfigError):
        GlobalRestorationModule(attention="swin")
    with pytest.raises(ConfigError):
        GlobalRestorationModule(widths=(8, 18, 32), heads=(1, 4, 4))
    with pytest.raises(ConfigError):
        tiny_grm()(torch.randn(1, 3, 8, 8))


def test_grm_loss_matches_formula_and_parts():
    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    conf = torch.rand(2, 1, 5, 6, generator=g) * 0.9 + 0.05
    loss, parts = grm_loss(y, x, conf, lam=0.5, eta=0.7, eps=1e-6)
    e2 = ((y - x) ** 2).sum(1, keepdim=True)
    expect = (y - x).abs().mean() + 0.5 * (conf * e2 - 0.7 * torch.log(conf + 1e-6)).mean()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(parts["l1"], (y - x).abs().mean())
    torch.testing.assert_close(parts["conf_term"], (conf * e2 - 0.7 * torch.log(conf + 1e-6)).mean())
    assert set(parts) >= {"l1", "conf_term", "weighted_err", "neg_log_conf", "mean_conf", "mean_err2"}
    with pytest.raises(ConfigError):
        grm_loss(y, x, conf, eta=0.0)
    with pytest.raises(ConfigError):
        grm_loss(y, x, conf[:, :, :4], eta=1.0)


def test_grm_loss_optimum_over_confidence_is_min_1_eta_over_e2():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 6, 6, generator=g)
    # per-pixel errors spread over two decades, so both branches of min(1, η/e²) occur
    scale = torch.logspace(-1.5, 0.5, 36).reshape(1, 1, 6, 6)
    y = x + scale * torch.randn(1, 4, 6, 6, generator=g)
    eta = 0.3
    e2 = ((y - x) ** 2).sum(1, keepdim=True)
    target = optimal_confidence(e2, eta)
    assert 0.2 < (target < 1).float().mean() < 0.9

    logit = torch.zeros(1, 1, 6, 6, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.05)
    for _ in range(1500):
        loss, _ = grm_loss(y, x, torch.sigmoid(logit), eta=eta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    conf = torch.sigmoid(logit.detach())
    inner = target < 0.99
    torch.testing.assert_close(conf[inner], target[inner], rtol=0, atol=0.01)
    assert bool((conf[~inner] > 0.97).all())  # C* = 1 is only approached through the sigmoid

    # the same on a grid, per pixel value of e²
    grid = torch.linspace(1e-4, 1.0, 100001, dtype=torch.float64)
    for e2v in (0.05, 0.3, 0.5, 2.0, 30.0):
        f = grid * e2v - eta * torch.log(grid + 1e-6)
        best = grid[f.argmin()].item()
        assert best == pytest.approx(min(1.0, eta / e2v), abs=2e-4)


def test_optimal_confidence():
    e2 = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 8.0])
    torch.testing.assert_close(optimal_confidence(e2, 0.5), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.25, 0.0625]))
    # PATCHSCALER.md a.2: C = 0.95 ⇔ e² ≈ 1.053·η; C = 0.75 ⇔ e² ≈ 1.333·η
    assert optimal_confidence(torch.tensor(1.053), 1.0).item() == pytest.approx(0.95, abs=1e-3)
    assert optimal_confidence(torch.tensor(4 / 3), 1.0).item() == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(ConfigError):
        optimal_confidence(e2, 0.0)


@pytest.mark.parametrize("target", [1.0, 0.9, 0.8])
def test_calibrate_eta_gives_the_median_pixel_its_target(target):
    e2 = torch.empty(20001).uniform_(0.5, 4.0, generator=torch.Generator().manual_seed(0))
    eta = calibrate_eta(e2, median_conf=target)
    assert eta == pytest.approx(target * e2.median().item(), rel=1e-6)
    conf = optimal_confidence(e2, eta)
    assert conf.median().item() == pytest.approx(target, abs=1e-3)
    if target == 1.0:  # half the pixels are fully confident
        assert (conf == 1).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_calibrate_eta_rejects_degenerate_input():
    with pytest.raises(ConfigError):
        calibrate_eta(torch.zeros(10))
    with pytest.raises(ConfigError):
        calibrate_eta(torch.rand(10), median_conf=0.0)
    with pytest.raises(ConfigError):
        calibrate_eta(torch.tensor([]))
    assert calibrate_eta(torch.tensor([1.0, 2.0, 3.0, 4.0]), quantile=0.75) == pytest.approx(3.25)


def test_group_fractions_on_a_constructed_map():
    # 2×3 windows of 16×16 with means: 1.0, 0.96 | 0.9, 0.75 | 0.76, 0.2   (γ1 = 0.95, γ2 = 0.75)
    means = torch.tensor([[1.0, 0.96, 0.9], [0.75, 0.76, 0.2]])
    conf = means.repeat_interleave(16, 0).repeat_interleave(16, 1)[None, None].clone()
    conf[0, 0, :8, :16] = 0.9  # window (0,0): mean 0.95 from two halves → medium (boundary is (γ2, γ1])
    conf[0, 0, 8:16, :16] = 1.0
    fr = group_fractions(conf)
    assert fr == pytest.approx({"simple": 1 / 6, "medium": 3 / 6, "hard": 2 / 6})
    assert sum(fr.values()) == pytest.approx(1.0)
    # exact binary boundaries: A = 0.5 is medium for (0.5, 0.25), A = 0.25 is hard
    half = torch.full((1, 1, 16, 32), 0.5)
    half[..., 16:] = 0.25
    assert group_fractions(half, thresholds=(0.5, 0.25)) == {"simple": 0.0, "medium": 0.5, "hard": 0.5}
    # overlapping windows with the last one snapped to the border: 41 → starts 0, 12, 24, 25
    assert window_means(torch.rand(2, 1, 41, 16), patch=16, stride=12).shape == (2, 4, 1)
    assert window_means(torch.rand(1, 1, 5, 7)).shape == (1, 1, 1)  # smaller than a window
    with pytest.raises(ConfigError):
        group_fractions(conf, thresholds=(0.7, 0.9))


def test_tiny_grm_confidence_falls_where_its_error_rises():
    """Left half: x = y_lr (learnable exactly). Right half: x = y_lr + fresh noise (unpredictable;
    the input there is textured so the module can tell the halves apart). After a short training with
    Eq. (1) the confidence must be clearly higher on the left."""
    grm = tiny_grm("bottleneck")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(grm.parameters(), lr=4e-3)
    eta = 1.0  # e² on the right ≈ 4 channels × σ² = 4 → C* ≈ 0.25; on the left C* = 1

    def batch(n=6):
        y = 0.1 * torch.randn(n, 4, 16, 16, generator=g)
        y[..., 8:] = torch.randn(n, 4, 16, 8, generator=g)
        x = y.clone()
        x[..., 8:] += torch.randn(n, 4, 16, 8, generator=g)
        return y, x

    for _ in range(100):
        y, x = batch()
        y_hr, conf = grm(y)
        loss, _ = grm_loss(y_hr, x, conf, eta=eta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y, x = batch(8)
        _, conf = grm(y)
    left, right = conf[..., :8].mean().item(), conf[..., 8:].mean().item()
    assert left > 0.85 and right < 0.5 and left - right > 0.4, (left, right)
    assert right == pytest.approx(eta / 4, abs=0.1)  # C* = η/e² with e² ≈ 4 on the right
    fr = group_fractions(conf, patch=8, stride=8)
    assert fr["simple"] + fr["medium"] >= 0.5 and fr["hard"] >= 0.5


# ------------------------------------------------------------------------------------ Patch-DiT


def dit_inputs(b: int = 3, v: int = 16, seed: int = 0, prompt_len: int = 12):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 4, v, v, generator=g)
    y0 = torch.randn(b, 4, v, v, generator=g)
    t = torch.randint(1, 1001, (b,), generator=g)
    prompt = torch.randn(b, prompt_len, 64, generator=g)
    return x_t, t, y0, prompt


def test_patch_dit_shapes_tiny():
    model = tiny_dit()
    x_t, t, y0, prompt = dit_inputs()
    assert model(x_t, t, y0, prompt).shape == (3, 4, 16, 16)
    assert model(x_t, t.float(), y0, None).shape == (3, 4, 16, 16)
    assert model(x_t, 500, y0, prompt[:1]).shape == (3, 4, 16, 16)  # scalar t, shared prompt
    for v in (8, 24):  # other patch sides get their positional embedding on the fly
        x, tt, y, p = dit_inputs(b=2, v=v)
        assert randomise(tiny_dit())(x, tt, y, p).shape == (2, 4, v, v)
    assert model(torch.randn(1, 4, 16, 8), t[:1], torch.randn(1, 4, 16, 8), None).shape == (1, 4, 16, 8)
    cfg = PRESETS["B/2"]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.patch_size, cfg.in_channels + cfg.cond_channels) == (
        768,
        12,
        12,
        2,
        8,
    )
    assert (PRESETS["S/2"].hidden, PRESETS["S/2"].depth, PRESETS["S/2"].heads) == (384, 12, 6)
    assert model.x_embed(torch.cat([x_t, y0], 1)).flatten(2).shape[-1] == 64  # 64 tokens on 16×16


def test_patch_dit_config_errors():
    with pytest.raises(ConfigError):
        PatchDiTConfig(hidden=66, heads=4)
    with pytest.raises(ConfigError):
        PatchDiTConfig(input_size=15)
    with pytest.raises(ConfigError):
        PatchDiTConfig(learn_sigma=True)
    model = tiny_dit()
    x_t, t, y0, prompt = dit_inputs()
    with pytest.raises(ConfigError):
        model(x_t[..., :15, :15], t, y0[..., :15, :15], None)
    with pytest.raises(ConfigError):
        model(x_t, t, y0, prompt[:2])
    with pytest.raises(ConfigError):
        model(x_t, t, y0, torch.randn(3, 5, 32))


def test_patch_dit_blocks_and_gates_start_as_identity():
    model = tiny_dit()
    x_t, t, y0, prompt = dit_inputs()
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: torch.testing.assert_close(o, i[0], rtol=0, atol=0))
    out = model(x_t, t, y0, prompt)
    assert torch.equal(out, torch.zeros_like(out))  # the zero-initialised final layer, as in DiT
    # with a non-zero output layer the prompt still has no effect: adaLN-Zero and g(t) gate it off
    with torch.no_grad():
        model.final.linear.weight.normal_(0, 0.1)
        model.final.ada[-1].weight.normal_(0, 0.1)
    a = model(x_t, t, y0, prompt)
    b = model(x_t, t, y0, torch.randn_like(prompt))
    c = model(x_t, t, y0, None)
    assert a.abs().max() > 0 and torch.equal(a, b) and torch.equal(a, c)


def test_patch_dit_prompt_changes_the_output_once_gates_open():
    model = randomise(tiny_dit())
    x_t, t, y0, prompt = dit_inputs()
    a = model(x_t, t, y0, prompt)
    b = model(x_t, t, y0, prompt + torch.randn_like(prompt))
    assert (a - b).abs().max() > 1e-3
    assert (a - model(x_t, t, y0, None)).abs().max() > 1e-3
    # only the cross-attention gate g(t) closed → the prompt has no effect again
    with torch.no_grad():
        for block in model.blocks:
            block.cross_gate[-1].weight.zero_()
            block.cross_gate[-1].bias.zero_()
    assert torch.equal(model(x_t, t, y0, prompt), model(x_t, t, y0, None))


def test_prompt_cache_equals_uncached_and_slices_by_index():
    model = randomise(tiny_dit())
    x_t, t, y0, prompt = dit_inputs(b=5)
    with torch.no_grad():
        cache = model.prompt_cache(prompt)
        assert isinstance(cache, PromptCache) and len(cache) == 5 and len(cache.kv) == 2
        assert cache.kv[0][0].shape == (5, 4, 12, 16)
        full = model(x_t, t, y0, cache)
        assert torch.equal(full, model(x_t, t, y0, prompt))
        idx = torch.tensor([3, 0])
        part = model(x_t[idx], t[idx], y0[idx], cache[idx])
        assert torch.equal(part, model(x_t[idx], t[idx], y0[idx], prompt[idx]))
        torch.testing.assert_close(part, full[idx], rtol=1e-5, atol=1e-6)
        mask = torch.tensor([True, False, True, False, True])
        assert len(cache[mask]) == 3 and len(cache[1:3]) == 2 and len(cache[4]) == 1
        torch.testing.assert_close(model(x_t[4:], t[4:], y0[4:], cache[4]), full[4:], rtol=1e-5, atol=1e-6)


def test_prompt_kv_projections_run_once_per_cache_not_per_step():
    model = randomise(tiny_dit())
    x_t, t, y0, prompt = dit_inputs()
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    for block in model.blocks:
        block.cross.to_k.register_forward_hook(count)
        block.cross.to_v.register_forward_hook(count)
    depth = len(model.blocks)
    with torch.no_grad():
        cache = model.prompt_cache(prompt)
        assert calls["n"] == 2 * depth
        for step_t in (700, 400, 100, 1):  # a sampler's steps reuse the cache
            model(x_t, torch.full((3,), step_t), y0, cache)
        assert calls["n"] == 2 * depth
        model(x_t, t, y0, cache[torch.tensor([1])].to(torch.float32))
        assert calls["n"] == 2 * depth
        model(x_t, t, y0, prompt)  # a raw prompt builds its cache once inside the call
        assert calls["n"] == 4 * depth


def test_prompt_cache_passes_gradients_to_the_prompt():
    model = randomise(tiny_dit())
    x_t, t, y0, prompt = dit_inputs()
    prompt.requires_grad_(True)
    model(x_t, t, y0, model.prompt_cache(prompt)).square().mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().max() > 0


def test_tiny_patch_dit_overfits_four_patches():
    model = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16, generator=g)
    y0 = x0 + 0.5 * torch.randn(4, 4, 16, 16, generator=g)
    acp = linear_alphas_cumprod()
    t = torch.full((4,), 500)
    a = acp[499].float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(4, 4, 16, 16, generator=g)
    prompt = torch.randn(4, 8, 64, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x_t, t, y0, prompt), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_diffusion_loss_is_ddpm_on_the_x_trajectory():
    acp = linear_alphas_cumprod()
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x_t, t, y0, prompt):
            seen.update(x_t=x_t, t=t, y0=y0, prompt=prompt)
            return torch.zeros_like(x_t)

    x0 = torch.randn(3, 4, 16, 16)
    y0 = torch.randn(3, 4, 16, 16, requires_grad=True)
    t = torch.tensor([1, 400, 1000])
    loss = diffusion_loss(Recorder(), x0, y0, None, acp, t=t, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    a = acp[t - 1].float()[:, None, None, None]
    torch.testing.assert_close(seen["x_t"], a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert torch.equal(seen["t"], t) and not seen["y0"].requires_grad  # stop-gradient on y0 (D4)
    torch.testing.assert_close(loss, x0.square().mean())
    # drawn timesteps are 1-based and within 1..T
    diffusion_loss(Recorder(), x0.repeat(100, 1, 1, 1), y0.repeat(100, 1, 1, 1), None, acp[:3])
    assert int(seen["t"].min()) >= 1 and int(seen["t"].max()) <= 3 and len(set(seen["t"].tolist())) == 3
    with pytest.raises(ConfigError):
        diffusion_loss(Recorder(), x0, y0, None, acp, t=torch.tensor([0, 1, 2]))


def test_diffusion_loss_trains_a_tiny_patch_dit():
    model = tiny_dit()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 16, 16, generator=g)
    y0 = x0 + 0.1 * torch.randn(4, 4, 16, 16, generator=g)  # a good coarse patch
    prompt = torch.randn(4, 8, 64, generator=g)
    acp = linear_alphas_cumprod()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = diffusion_loss(model, x0, y0, prompt, acp, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first / 4, (first, last)


def test_alphas_cumprod_schedules():
    acp = linear_alphas_cumprod()
    assert acp.dtype == torch.float64 and acp.shape == (1000,)
    sq = acp[[399, 699, 999]].sqrt()
    assert sq.tolist() == pytest.approx([0.442, 0.084, 0.006], abs=1e-3)
    assert acp[0].item() == pytest.approx(1 - 1e-4)
    sq = scaled_linear_alphas_cumprod()[[399, 699, 999]].sqrt()
    assert sq.tolist() == pytest.approx([0.653, 0.288, 0.068], abs=1e-3)
    assert bool((acp[1:] < acp[:-1]).all()) and math.isclose(linear_alphas_cumprod(1).item(), 1 - 1e-4)
    with pytest.raises(ConfigError):
        linear_alphas_cumprod(0)


def _grads_and_calls(model, run, block):
    calls = []
    inner = next(m for m in block.modules() if m is not block and not list(m.children()))  # a leaf inside
    h = inner.register_forward_hook(lambda *a: calls.append(1))  # (the checkpointed module's own hooks
    # do not run again in the recomputation; its submodules' do)
    try:
        run(model).square().mean().backward()
    finally:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("which", ["dit", "grm"])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(which):
    """With gradient checkpointing a block runs again in the backward pass (its activations were not
    kept) and the gradients are those of a plain run."""
    g = torch.Generator().manual_seed(0)
    if which == "dit":
        cfg = PRESETS["tiny"]
        x, y0 = (
            torch.randn(2, cfg.in_channels, 16, 16, generator=g),
            torch.randn(2, cfg.cond_channels, 16, 16, generator=g),
        )
        prompt = torch.randn(2, 3, cfg.prompt_dim, generator=g)
        make, run = (lambda: randomise(tiny_dit())), (lambda m: m(x, torch.tensor([10, 500]), y0, prompt))
        block = lambda m: m.blocks[0]  # noqa: E731
    else:
        y = torch.randn(1, 4, 12, 20, generator=g)
        make, run = (lambda: randomise(tiny_grm())), (lambda m: torch.cat(m(y), 1))
        block = lambda m: m.bottleneck  # noqa: E731
    plain = make()
    ref, n_plain = _grads_and_calls(plain, run, block(plain))
    ckpt = make()
    ckpt.gradient_checkpointing = True
    got, n_ckpt = _grads_and_calls(ckpt, run, block(ckpt))
    assert (n_plain, n_ckpt) == (1, 2)
    assert ref.keys() == got.keys() and len(ref) > 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
