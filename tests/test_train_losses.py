"""Training losses: LPIPS wrapper, CSD against a hand computation, vision-aided discriminator."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffsr.errors import ConfigError
from diffsr.train.losses import (
    LPIPSLoss,
    VisionAidedDiscriminator,
    csd_loss,
    d_loss,
    d_loss_fake,
    d_loss_real,
    frozen,
    g_loss,
)

# --------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_loss():
    return LPIPSLoss("vgg", pretrained=False)


def test_lpips_shape_zero_positive_and_grad(lpips_loss):
    assert all(not p.requires_grad for p in lpips_loss.parameters())
    lpips_loss.train()
    assert not lpips_loss.net.training
    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    x = (y + 0.3 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1).requires_grad_(True)
    same = lpips_loss(y, y)
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    d = lpips_loss(x, y)
    assert d.shape == (3,) and bool((d > 0).all())
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        lpips_loss(x[:, :1], y[:, :1])


def test_lpips_bad_net():
    with pytest.raises(ConfigError, match="net"):
        LPIPSLoss("resnet", pretrained=False)


# --------------------------------------------------------------------------------------------
# CSD


@pytest.fixture(scope="module")
def sd():
    from diffsr.synthetic import random_sd_parts

    parts = random_sd_parts("tiny", seed=0, text_encoder=False)
    return parts.unet, parts.alphas_cumprod


def _embeds(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 77, 32, generator=g), torch.randn(b, 77, 32, generator=g)


def _hand_grad(z, unet, ac, prompt, neg, *, seed, t_min=20, t_max=500, cfg=7.5):
    """d csd / d z computed independently: same draws, two separate UNet calls, float64 schedule."""
    g = torch.Generator().manual_seed(seed)
    b = z.shape[0]
    t = torch.randint(t_min, t_max, (b,), generator=g)
    eps = torch.randn(z.shape, generator=g)
    a = ac.double()[t].view(b, 1, 1, 1)
    z = z.detach().double()
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps.double()
    with torch.no_grad():
        e_u = unet(z_t.float(), t, encoder_hidden_states=neg).sample.double()
        e_c = unet(z_t.float(), t, encoder_hidden_states=prompt).sample.double()
    e_cfg = e_u + cfg * (e_c - e_u)
    x0_real = (z_t - (1 - a).sqrt() * e_cfg) / a.sqrt()
    x0_fake = (z_t - (1 - a).sqrt() * e_u) / a.sqrt()
    w = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    return (2 * (x0_fake - x0_real) / w / z.numel()).float(), t


@pytest.mark.parametrize("cfg", [7.5, 1.0])
def test_csd_gradient_matches_hand_computation(sd, cfg):
    unet, ac = sd
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    prompt, neg = _embeds(2)
    loss = csd_loss(z, unet, ac, prompt, neg, cfg=cfg, generator=torch.Generator().manual_seed(7))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    expected, t = _hand_grad(z, unet, ac, prompt, neg, seed=7, cfg=cfg)
    assert bool(((t >= 20) & (t < 500)).all())
    assert expected.abs().max() > 0
    torch.testing.assert_close(z.grad, expected, rtol=2e-3, atol=1e-7)
    # the frozen UNet got no gradient
    assert all(p.grad is None for p in unet.parameters())


class _Recorder(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append((x.shape, t.clone(), encoder_hidden_states.clone()))
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)


def test_csd_timesteps_and_single_batched_call(sd):
    unet, ac = sd
    rec = _Recorder(unet)
    prompt, neg = _embeds(4)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(5):
        z = torch.randn(4, 4, 8, 8, requires_grad=True)
        csd_loss(z, rec, ac, prompt, neg, generator=g)
        seen.append(rec.calls[-1][1])
    assert len(rec.calls) == 5  # one UNet call per loss
    shape, t, e = rec.calls[0]
    assert shape == (8, 4, 8, 8)
    assert torch.equal(t[:4], t[4:])
    assert torch.equal(e[:4], neg) and torch.equal(e[4:], prompt)  # [neg, prompt] order
    all_t = torch.cat(seen)
    assert int(all_t.min()) >= 20 and int(all_t.max()) < 500
    assert len(set(all_t.tolist())) > 5
    csd_loss(torch.randn(4, 4, 8, 8), rec, ac, prompt, neg, t_min=300, t_max=301, generator=g)
    assert bool((rec.calls[-1][1] == 300).all())


def test_csd_cfg_scaling(sd):
    unet, ac = sd
    prompt, neg = _embeds(2)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def grad(cfg, p=prompt, n=neg):
        z = z0.clone().requires_grad_(True)
        csd_loss(z, unet, ac, p, n, cfg=cfg, generator=torch.Generator().manual_seed(1)).backward()
        return z.grad

    # no guidance: the "real" and "fake" scores coincide, CSD gives exactly nothing
    assert torch.equal(grad(0.0), torch.zeros_like(z0))
    # identical prompts: no classifier direction at any scale
    assert torch.equal(grad(7.5, prompt, prompt), torch.zeros_like(z0))
    # otherwise the direction is the same at every cfg > 0; only its (normalised) size changes
    g1, g4 = grad(1.0), grad(4.0)
    assert g1.abs().max() > 0
    cos = torch.nn.functional.cosine_similarity(g1.flatten(1), g4.flatten(1), dim=1)
    assert bool((cos > 0.999).all())


def test_csd_broadcasts_embeddings_and_validates(sd):
    unet, ac = sd
    prompt, neg = _embeds(1)
    z = torch.randn(3, 4, 8, 8, requires_grad=True)
    csd_loss(z, unet, ac, prompt, neg, generator=torch.Generator().manual_seed(0)).backward()
    assert z.grad.shape == z.shape and torch.isfinite(z.grad).all()
    with pytest.raises(ConfigError):
        csd_loss(z, unet, ac, prompt, neg, t_min=500, t_max=20)
    with pytest.raises(ConfigError):
        csd_loss(z, unet, ac, prompt, neg, t_max=1001)
    with pytest.raises(ConfigError):
        csd_loss(z, unet, ac, torch.randn(2, 77, 32), neg)


def test_csd_half_precision_unet(sd):
    unet, ac = sd
    half = copy.deepcopy(unet).to(torch.bfloat16)
    prompt, neg = _embeds(2)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = csd_loss(z, half, ac, prompt, neg, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.float32
    assert torch.isfinite(z.grad).all()


# --------------------------------------------------------------------------------------------
# vision-aided discriminator

TINY = dict(
    backbone="vit_tiny_patch16_224",
    pretrained=False,
    layers=(0, 1, 2),
    head_channels=16,
    img_size=64,
    diffaug=False,
)


@pytest.fixture
def disc():
    torch.manual_seed(0)
    return VisionAidedDiscriminator(**TINY)


def _images(b, seed, size=48):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_disc_outputs_and_parameters(disc):
    maps = disc(_images(2, 0, size=80))
    assert len(maps) == 3
    # 4×4 tokens (64 / patch 16) → blur(pad 2) 5 → conv3 s2 2 → blur(pad 1) 1 → conv1 s2 1; class token
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1, 1), (2, 1, 1, 1), (2, 1)]
    head_params = set(map(id, disc.heads.parameters()))
    assert set(map(id, disc.trainable_parameters())) == head_params
    assert all(p.requires_grad for p in disc.trainable_parameters())
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    disc.train()
    assert disc.heads.training and not disc.backbone.training


def test_disc_layer_order_and_negative_indices():
    torch.manual_seed(0)
    a = VisionAidedDiscriminator(**{**TINY, "layers": (0, 2)})
    torch.manual_seed(0)
    b = VisionAidedDiscriminator(**{**TINY, "layers": (2, -12)})  # same backbone: heads come after it
    assert b.layers == (2, 0)
    x = _images(1, 1)
    fa, fb = a.features(x), b.features(x)
    for i, j in ((0, 1), (1, 0)):
        torch.testing.assert_close(fa[i][0], fb[j][0])
        torch.testing.assert_close(fa[i][1], fb[j][1])
    with pytest.raises(ConfigError):
        VisionAidedDiscriminator(**{**TINY, "layers": (0, 12)})
    with pytest.raises(ConfigError):
        VisionAidedDiscriminator(**{**TINY, "layers": (1, 1)})
    with pytest.raises(ConfigError, match="not_a_backbone"):
        VisionAidedDiscriminator(**{**TINY, "backbone": "not_a_backbone"})


def test_disc_gradient_reaches_input(disc):
    x = _images(2, 2).requires_grad_(True)
    g_loss(disc, x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_frozen_keeps_disc_grads_untouched(disc):
    x = _images(2, 3).requires_grad_(True)
    with frozen(disc):
        assert all(not p.requires_grad for p in disc.parameters())
        loss = g_loss(disc, x)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.trainable_parameters())
    # flags restored: heads trainable again, backbone still frozen
    assert all(p.requires_grad for p in disc.trainable_parameters())
    assert all(not p.requires_grad for p in disc.backbone.parameters())

    # existing discriminator grads stay exactly as they were
    d_loss(disc, _images(2, 4), _images(2, 5)).total.backward()
    before = [p.grad.clone() for p in disc.trainable_parameters()]
    y = _images(2, 6).requires_grad_(True)
    with frozen(disc):
        g_loss(disc, y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(disc.trainable_parameters(), before, strict=True))
    assert y.grad is not None

    # restored on error too
    with pytest.raises(RuntimeError), frozen(disc):
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in disc.trainable_parameters())


def test_d_loss_terms_and_values(disc):
    disc.eval()  # no spectral-norm power iteration between the calls: exact comparison
    real, fake = _images(2, 7), _images(2, 8).requires_grad_(True)
    terms = d_loss(disc, real, fake)
    loss_real, loss_fake = terms  # a (real, fake) named tuple
    torch.testing.assert_close(loss_real, d_loss_real(disc, real))
    torch.testing.assert_close(loss_fake, d_loss_fake(disc, fake))
    torch.testing.assert_close(terms.total, loss_real + loss_fake)
    only_real, only_fake = d_loss(disc, real, None), d_loss(disc, None, fake)
    assert only_real.fake is None and only_fake.real is None
    torch.testing.assert_close(only_real[0], loss_real)
    torch.testing.assert_close(only_fake[1], loss_fake)
    torch.testing.assert_close(only_fake.total, loss_fake)
    with pytest.raises(ConfigError):
        d_loss(disc, None, None)
    terms.total.backward()
    assert fake.grad is None  # fake is detached for D
    # BCE against 0.8: minimum is the entropy of 0.8, reached at logit log(4)
    maps = [torch.full((1, 1, 2, 2), float(torch.log(torch.tensor(4.0))))]

    class Const(nn.Module):
        def forward(self, x):
            return maps

    h08 = -(0.8 * torch.log(torch.tensor(0.8)) + 0.2 * torch.log(torch.tensor(0.2)))
    torch.testing.assert_close(g_loss(Const(), real), h08)
    torch.testing.assert_close(d_loss_real(Const(), real), h08)


def test_d_loss_learns_real_up(disc):
    real, fake = _images(4, 9), _images(4, 10) * 0.2  # fakes: low-contrast images
    disc.train()
    opt = torch.optim.SGD(disc.trainable_parameters(), lr=0.5)

    def mean_logit(x):
        with torch.no_grad():
            return torch.stack([m.mean() for m in disc(x)]).mean()

    real0, fake0 = mean_logit(real), mean_logit(fake)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = d_loss(disc, real, fake).total
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert mean_logit(real) > real0
    assert mean_logit(real) - mean_logit(fake) > real0 - fake0
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_disc_matches_the_vision_aided_layout_at_224():
    """Default layers 4, 8, 11 read after the final norm (DINO's get_intermediate_layers(n=8)[0, 4, -1]),
    CLIP mean / ImageNet std, area resize; heads restated with plain conv ops give the same logits."""
    torch.manual_seed(0)
    d = VisionAidedDiscriminator(
        backbone="vit_tiny_patch16_224", pretrained=False, head_channels=8, diffaug=False
    ).eval()
    assert d.layers == (4, 8, 11)
    x = _images(2, 11, size=256)
    maps = d(x)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 3, 3), (2, 1, 3, 3), (2, 1)]
    # features, independently: area resize, normalise, run the blocks, final norm
    vit = d.backbone
    y = torch.nn.functional.interpolate(x * 0.5 + 0.5, size=(224, 224), mode="area")
    y = (y - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # fmt: skip
    t = vit._pos_embed(vit.patch_embed(y))
    t = vit.norm_pre(t)
    outs = {}
    for k, blk in enumerate(vit.blocks):
        t = blk(t)
        outs[k] = vit.norm(t)
    blur = torch.tensor([1.0, 3, 3, 1])
    blur = (blur[:, None] * blur[None]) / 64

    def conv_head(head, f):
        c = f.shape[1]
        h = torch.nn.functional.conv2d(
            torch.nn.functional.pad(f, (2,) * 4), blur.expand(c, 1, 4, 4), groups=c
        )
        h = torch.nn.functional.conv2d(h, head[1].weight, head[1].bias, stride=2)
        h = torch.nn.functional.leaky_relu(h, 0.2)
        h = torch.nn.functional.conv2d(torch.nn.functional.pad(h, (1,) * 4), blur.expand(h.shape[1], 1, 4, 4),
                                       groups=h.shape[1])  # fmt: skip
        return torch.nn.functional.conv2d(h, head[4].weight, head[4].bias, stride=2)

    for i, k in enumerate((4, 8)):
        f = outs[k][:, 1:].transpose(1, 2).reshape(2, -1, 14, 14)
        torch.testing.assert_close(maps[i], conv_head(d.heads[i], f), rtol=1e-4, atol=1e-5)
    cls = outs[11][:, 0]
    lin = d.heads[2]
    want = torch.nn.functional.linear(torch.nn.functional.leaky_relu(
        torch.nn.functional.linear(cls, lin[0].weight, lin[0].bias), 0.2), lin[2].weight, lin[2].bias)  # fmt: skip
    torch.testing.assert_close(maps[2], want, rtol=1e-4, atol=1e-5)


def test_gan_losses_sum_bce_over_levels():
    logit = float(torch.log(torch.tensor(4.0)))
    levels = [torch.full((1, 1, 3, 3), logit), torch.full((1, 1, 3, 3), logit), torch.full((1, 1), logit)]

    class Const(nn.Module):
        def forward(self, x):
            return levels

    h08 = -(0.8 * torch.log(torch.tensor(0.8)) + 0.2 * torch.log(torch.tensor(0.2)))
    torch.testing.assert_close(g_loss(Const(), _images(1, 0)), 3 * h08)
    fake = torch.nn.functional.softplus(torch.tensor(logit))  # BCE(logit, 0)
    torch.testing.assert_close(d_loss_fake(Const(), _images(1, 0)), 3 * fake)


def _diff_augment_reference(x, g):
    """DiffAugment's color/translation/cutout restated with the official index arithmetic
    (meshgrid gathers on a 1-padded image; cutout by clamped index scatter), same draws."""
    b, _, h, w = x.shape
    r = lambda: torch.rand(b, 1, 1, 1, generator=g)  # noqa: E731
    x = x + (r() - 0.5)
    m = x.mean(1, keepdim=True)
    x = (x - m) * (r() * 2) + m
    m = x.mean((1, 2, 3), keepdim=True)
    x = (x - m) * (r() + 0.5) + m
    sx, sy = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    tx = torch.randint(-sx, sx + 1, (b, 1), generator=g)[:, :, None]
    ty = torch.randint(-sy, sy + 1, (b, 1), generator=g)[:, :, None]
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    x = torch.nn.functional.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)
    cs = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    ox = torch.randint(0, h + (1 - cs[0] % 2), (b, 1), generator=g)[:, :, None]
    oy = torch.randint(0, w + (1 - cs[1] % 2), (b, 1), generator=g)[:, :, None]
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(cs[0]), torch.arange(cs[1]), indexing="ij")
    gx = torch.clamp(gx + ox - cs[0] // 2, 0, h - 1)
    gy = torch.clamp(gy + oy - cs[1] // 2, 0, w - 1)
    mask = torch.ones(b, h, w)
    mask[gb, gx, gy] = 0
    return x * mask[:, None]


def test_diff_augment_matches_the_official_policy():
    from diffsr.train.losses import diff_augment

    for h, w in ((16, 16), (15, 22)):
        x = _images(3, 4, size=h)[..., :w] if w <= h else torch.rand(3, 3, h, w) * 2 - 1
        got = diff_augment(x, torch.Generator().manual_seed(9))
        want = _diff_augment_reference(x, torch.Generator().manual_seed(9))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    x = _images(2, 5).requires_grad_(True)
    diff_augment(x, torch.Generator().manual_seed(1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not torch.equal(diff_augment(x, torch.Generator().manual_seed(1)),
                           diff_augment(x, torch.Generator().manual_seed(2)))  # fmt: skip
    # the discriminator augments each call unless told not to
    torch.manual_seed(0)
    d = VisionAidedDiscriminator(**{**TINY, "diffaug": True}).eval()
    y = _images(2, 6)
    a, b = d(y, generator=torch.Generator().manual_seed(3)), d(y, generator=torch.Generator().manual_seed(3))
    c = d(y, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
