"""Training losses: LPIPS, PiSA-SR's classifier score distillation (CSD), and a vision-aided GAN.

* :class:`LPIPSLoss` wraps the ``lpips`` package (frozen).
* :func:`csd_loss` is PiSA-SR's CSD in its official latent-space form: a frozen SD UNet's
  classifier-free-guidance direction, turned into a stop-gradient MSE target for the student's latents.
* :class:`VisionAidedDiscriminator` is Kumari et al.'s vision-aided discriminator as S3Diff configures
  it (frozen DINO ViT-B/16, DiffAugment, spectral-norm heads on blocks 4 and 8 and the class token of
  block 11), with :func:`d_loss` / :func:`g_loss` (BCE summed over the levels, real label smoothed to
  0.8) and :func:`frozen`.

lpips and timm are imported lazily (``pip install diffsr[train]``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.errors import ConfigError, WeightsNotFoundError, hint

__all__ = [
    "REAL_LABEL",
    "DLoss",
    "LPIPSLoss",
    "VisionAidedDiscriminator",
    "diff_augment",
    "csd_loss",
    "d_loss",
    "d_loss_fake",
    "d_loss_real",
    "frozen",
    "g_loss",
]

INSTALL_HINT = "pip install diffsr[train]"
REAL_LABEL = 0.8
"""BCE target of real images (and of the generator's fakes): vision-aided GAN's 'sigmoid_s' smoothing."""


def _module_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in module.parameters():
        return p.dtype
    return torch.float32


# --------------------------------------------------------------------------------------------
# LPIPS


class LPIPSLoss(nn.Module):
    """LPIPS distance (Zhang et al. 2018) of the ``lpips`` package, frozen.

    ``net``: "vgg" (PiSA-SR / S3Diff), "alex" or "squeeze". ``pretrained=False`` keeps the backbone
    random (nothing is downloaded; for tests); the linear heads always come from the lpips wheel.
    With ``pretrained=True`` the torchvision backbone weights must be in the torch hub cache or
    downloadable.
    """

    def __init__(self, net: str = "vgg", pretrained: bool = True, weights: str | None = None) -> None:
        super().__init__()
        if net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"LPIPS net must be 'vgg', 'alex' or 'squeeze', got {net!r}")
        try:
            import lpips
        except ImportError:
            raise ConfigError(f"LPIPSLoss needs the lpips package: {INSTALL_HINT}") from None
        if weights is not None:
            from pathlib import Path

            if not Path(weights).is_file():
                raise WeightsNotFoundError(f"LPIPS backbone weights {weights}: no such file")
        with warnings.catch_warnings():
            # lpips still calls torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            try:
                model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained or weights is not None,
                                    verbose=False)  # fmt: skip
            except OSError as e:  # URLError is an OSError: backbone weights not cached, no network
                raise WeightsNotFoundError(
                    f"LPIPS {net} backbone weights (torchvision) could not be loaded or downloaded: {e}; "
                    f"pass {hint('lpips_weights=FILE', '--lpips-weights FILE')} (torchvision's {LPIPS_BACKBONE_FILES[net]}) or put that file "
                    f"in {torch.hub.get_dir()}/checkpoints"
                ) from None
        if weights is not None:
            _load_torchvision_features(model.net, weights, net)
        self.net = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        super().train(mode)
        self.net.eval()  # dropout in the linear heads stays off
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample LPIPS of images in [-1, 1], ``(B, 3, H, W)`` each → ``(B,)`` (float32).

        Gradients flow to both inputs."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(
                f"LPIPSLoss wants two (B, 3, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        dtype = _module_dtype(self.net)
        return self.net(x.to(dtype), y.to(dtype)).reshape(x.shape[0])


LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
                        "squeeze": "squeezenet1_1-b8a52dc0.pth"}  # fmt: skip
"""torchvision's file names of the LPIPS backbones (what torch.hub caches under checkpoints/)."""


def _load_torchvision_features(pnet: nn.Module, path, net: str) -> None:
    """Copy a torchvision classification checkpoint's ``features.N.*`` tensors into lpips' sliced
    backbone (whose modules keep their torchvision index N as their name)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = pnet.state_dict()
    mapped = {}
    for name in own:
        index_and_param = name.split(".", 1)[1]  # slice3.10.weight -> 10.weight
        key = f"features.{index_and_param}"
        if key not in state:
            raise WeightsNotFoundError(f"{path}: not torchvision {net} weights (no {key})")
        mapped[name] = state[key]
    try:
        pnet.load_state_dict(mapped)
    except RuntimeError as e:
        raise WeightsNotFoundError(
            f"{path}: not torchvision {net} weights ({str(e).splitlines()[0]})"
        ) from None


# --------------------------------------------------------------------------------------------
# CSD


def csd_loss(
    z_h: torch.Tensor,
    unet: nn.Module,
    alphas_cumprod: torch.Tensor,
    prompt_embeds: torch.Tensor,
    neg_embeds: torch.Tensor,
    *,
    t_min: int = 20,
    t_max: int = 500,
    cfg: float = 7.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PiSA-SR's classifier score distillation loss on the student's latents ``z_h`` (B, 4, h, w).

    Draws, in this order and on the generator's device (``z_h``'s when None), ``t = randint(t_min,
    t_max, (B,))`` and ``ε = randn(z_h.shape)`` (float32); noises ``z_t = √ᾱ_t z_h + √(1−ᾱ_t) ε``
    (from ``z_h`` detached); one frozen-UNet call on ``[z_t, z_t]`` with ``[neg, prompt]`` embeddings
    gives ε_u, ε_c; ε_cfg = ε_u + cfg (ε_c − ε_u); x0_real / x0_fake are the x0 predictions of ε_cfg /
    ε_u; ``w`` = mean |z_h − x0_real| per sample; the loss is ``mse(z_h, sg(z_h − (x0_fake − x0_real)/w))``,
    whose gradient is ``2 (x0_fake − x0_real) / w / z_h.numel()``.

    The UNet runs in its own dtype under no_grad, the rest in float32. ``prompt_embeds`` /
    ``neg_embeds`` of batch 1 are broadcast to B. Returns the scalar loss (float32).
    """
    if z_h.ndim != 4:
        raise ConfigError(f"csd_loss: z_h must be (B, C, h, w) latents, got shape {tuple(z_h.shape)}")
    n_t = int(alphas_cumprod.shape[0])
    if not 0 <= t_min < t_max <= n_t:
        raise ConfigError(f"csd_loss: need 0 <= t_min < t_max <= {n_t}, got t_min={t_min}, t_max={t_max}")
    b, device = z_h.shape[0], z_h.device
    embeds = []
    for name, e in (("neg_embeds", neg_embeds), ("prompt_embeds", prompt_embeds)):
        if e.ndim != 3 or e.shape[0] not in (1, b):
            raise ConfigError(f"csd_loss: {name} must be (B or 1, L, D) with B={b}, got {tuple(e.shape)}")
        embeds.append(e.expand(b, -1, -1))

    draw = generator.device if generator is not None else device
    t = torch.randint(t_min, t_max, (b,), generator=generator, device=draw).to(device)
    eps = torch.randn(z_h.shape, generator=generator, device=draw, dtype=torch.float32).to(device)

    ac = alphas_cumprod.to(device=device, dtype=torch.float64)[t]
    sqrt_a = ac.sqrt().float().view(b, 1, 1, 1)
    sqrt_1ma = (1.0 - ac).sqrt().float().view(b, 1, 1, 1)

    with torch.no_grad():
        z = z_h.detach().float()
        z_t = sqrt_a * z + sqrt_1ma * eps
        udtype = _module_dtype(unet)
        out = unet(
            torch.cat([z_t, z_t]).to(udtype),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat(embeds).to(device=device, dtype=udtype),
        ).sample.float()
        eps_u, eps_c = out.chunk(2)
        eps_cfg = eps_u + cfg * (eps_c - eps_u)
        x0_real = (z_t - sqrt_1ma * eps_cfg) / sqrt_a
        x0_fake = (z_t - sqrt_1ma * eps_u) / sqrt_a
        # the official code divides unguarded; a floor only matters when x0_real == z_h exactly
        w = (z - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        grad = (x0_fake - x0_real) / w
        target = z - grad
    return F.mse_loss(z_h.float(), target)


# --------------------------------------------------------------------------------------------
# vision-aided discriminator (S3Diff: vision_aided_loss.Discriminator(cv_type="dino",
# output_type="conv_multi_level", loss_type="multilevel_sigmoid_s"), diffaug on)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""The mean vision-aided GAN normalises its DINO input with (CLIP's), paired with ImageNet's std."""
IMAGENET_STD = (0.229, 0.224, 0.225)


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment's "color,translation,cutout" policy (Zhao et al. 2020), as the vision-aided
    discriminator applies it to every image it sees. ``x`` (B, C, H, W), any range → same shape.

    Per sample, in this order: brightness + U(-0.5, 0.5); saturation (x − mean_c)·U(0, 2) + mean_c;
    contrast (x − mean_chw)·U(0.5, 1.5) + mean_chw; a translation by integers in
    [−round(H/8), round(H/8)] × [−round(W/8), round(W/8)] with zero fill; a zeroed square cutout of
    round(H/2) × round(W/2) centred at a uniform position. Draws come from ``generator`` (CPU; the
    global RNG when None). Differentiable w.r.t. ``x``."""
    b, _, h, w = x.shape

    def rand() -> torch.Tensor:
        return torch.rand(b, 1, 1, 1, generator=generator).to(x.device, x.dtype)

    def randint(lo: int, hi: int) -> torch.Tensor:  # [lo, hi)
        return torch.randint(lo, hi, (b, 1), generator=generator).to(x.device)

    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (rand() + 0.5) + mean
    # translation: output pixel (r, c) takes input (r + ty, c + tx), zero outside
    sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    ty, tx = randint(-sh, sh + 1), randint(-sw, sw + 1)
    rows = (torch.arange(h, device=x.device)[None] + ty + 1).clamp(0, h + 1)  # (B, H) into the 1-padded image
    cols = (torch.arange(w, device=x.device)[None] + tx + 1).clamp(0, w + 1)
    pad = F.pad(x, (1, 1, 1, 1))
    bi = torch.arange(b, device=x.device)[:, None, None]
    x = pad.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    # cutout
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    oy, ox = randint(0, h + (1 - ch % 2)), randint(0, w + (1 - cw % 2))
    r = torch.arange(h, device=x.device)[None]
    c = torch.arange(w, device=x.device)[None]
    in_r = (r >= oy - ch // 2) & (r < oy - ch // 2 + ch)
    in_c = (c >= ox - cw // 2) & (c < ox - cw // 2 + cw)
    keep = ~(in_r[:, :, None] & in_c[:, None, :])
    return (x * keep[:, None].to(x.dtype)).contiguous()


class _Blur(nn.Module):
    """A fixed 4×4 binomial low-pass ([1, 3, 3, 1] outer itself, normalised), depthwise, stride 1,
    zero padding ``pad`` on every side (antialiased-CNNs' BlurPool as the vision-aided heads use it)."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = a[:, None] * a[None, :]
        self.register_buffer("filt", (k / k.sum()).expand(channels, 1, 4, 4).clone(), persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (self.pad,) * 4), self.filt.to(x.dtype), groups=x.shape[1])


class VisionAidedDiscriminator(nn.Module):
    """The vision-aided discriminator S3Diff trains against: a frozen DINO ViT-B/16 with trainable
    heads on three levels.

    An input in [-1, 1] ``(B, 3, H, W)`` goes through :func:`diff_augment` (``diffaug``), is mapped to
    [0, 1], area-resized to ``img_size`` squared and normalised with :data:`CLIP_MEAN` /
    :data:`IMAGENET_STD` (the official pairing). The backbone's blocks ``layers`` (default 4, 8 and
    11: DINO's ``get_intermediate_layers(n=8)`` picked at [0, 4, -1]) are read after the final
    LayerNorm. Each level but the last feeds its patch-token map to Blur(pad 2) → SN-Conv3×3 stride 2
    (no padding) → LeakyReLU(0.2) → Blur(pad 1) → SN-Conv1×1 stride 2 → one logit map (B, 1, 3, 3 at
    224²); the last level feeds its class token to SN-Linear → LeakyReLU(0.2) → SN-Linear → (B, 1).
    ``head_channels`` = 128 as there. The backbone never trains (eval mode, requires_grad False) but
    passes gradients to the input. ``weights``: a local file of the backbone's weights (timm format,
    .safetensors or .pth) instead of the timm/Hugging Face download.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224.dino",
        pretrained: bool = True,
        layers: Sequence[int] = (4, 8, 11),
        head_channels: int = 128,
        img_size: int = 224,
        weights: str | None = None,
        diffaug: bool = True,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError(f"VisionAidedDiscriminator needs the timm package: {INSTALL_HINT}") from None
        kw: dict = {"num_classes": 0, "img_size": img_size}
        if weights is not None:
            from pathlib import Path

            if not Path(weights).is_file():
                raise WeightsNotFoundError(f"discriminator backbone weights {weights}: no such file")
            pretrained, kw["pretrained_cfg_overlay"] = True, {"file": str(weights)}
        try:
            model = timm.create_model(backbone, pretrained=pretrained, **kw)
        except OSError as e:  # not in the HF cache and no network
            raise WeightsNotFoundError(
                f"discriminator backbone {backbone!r}: pretrained weights not found ({type(e).__name__}); "
                f"pass {hint('disc_weights=FILE', '--disc-weights FILE')} (or download them once with network access)"
            ) from None
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"discriminator backbone {backbone!r} cannot be built by timm: {e}") from None
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
            raise ConfigError(
                f"discriminator backbone {backbone!r} is not a timm ViT with forward_intermediates"
            )
        depth = len(model.blocks)
        idx = []
        for layer in layers:
            k = int(layer)
            k = k + depth if k < 0 else k
            if not 0 <= k < depth:
                raise ConfigError(
                    f"discriminator layer {layer} is out of range for {backbone!r} ({depth} blocks)"
                )
            idx.append(k)
        if len(idx) < 1 or len(set(idx)) != len(idx):
            raise ConfigError(f"discriminator layers must be distinct block indices, got {tuple(layers)}")
        self.layers = tuple(idx)
        self.img_size = int(img_size)
        self.diffaug = bool(diffaug)
        self.backbone = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        c, hc = int(model.embed_dim), int(head_channels)
        sn = nn.utils.parametrizations.spectral_norm
        conv_heads = [
            nn.Sequential(
                _Blur(c, 2),
                sn(nn.Conv2d(c, hc, 3, stride=2)),
                nn.LeakyReLU(0.2),
                _Blur(hc, 1),
                sn(nn.Conv2d(hc, 1, 1, stride=2)),
            )  # fmt: skip
            for _ in idx[:-1]
        ]
        cls_head = nn.Sequential(sn(nn.Linear(c, hc)), nn.LeakyReLU(0.2), sn(nn.Linear(hc, 1)))
        self.heads = nn.ModuleList([*conv_heads, cls_head])

    def train(self, mode: bool = True) -> VisionAidedDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (the backbone is frozen)."""
        return list(self.heads.parameters())

    def features(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(token map (B, C, h, w), class token (B, C)) of each of ``self.layers``, in that order, for
        images already augmented; after the backbone's final norm."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"discriminator input must be (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = x.float() * 0.5 + 0.5
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="area")
        x = (x - self.mean) / self.std
        order = sorted(self.layers)
        feats = self.backbone.forward_intermediates(x.to(_module_dtype(self.backbone)), indices=order, norm=True,
                                                    return_prefix_tokens=True, output_fmt="NCHW",
                                                    intermediates_only=True, stop_early=True)  # fmt: skip
        by_layer = {k: (spatial, prefix[:, 0]) for k, (spatial, prefix) in zip(order, feats, strict=True)}
        return [by_layer[k] for k in self.layers]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) → one logit map (B, 1, h, w) per level but the last, then
        the class-token logit (B, 1). ``generator`` drives DiffAugment."""
        if self.diffaug:
            x = diff_augment(x, generator)
        feats = self.features(x)
        out = []
        for k, (head, (spatial, cls)) in enumerate(zip(self.heads, feats, strict=True)):
            w = next(head.parameters())
            out.append(head(cls.to(w.dtype) if k == len(feats) - 1 else spatial.to(w.dtype)))
        return out


def _bce(outputs: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """BCE with logits against a constant target, averaged within each level, summed over the levels
    (vision-aided GAN's multilevel loss)."""
    losses = [
        F.binary_cross_entropy_with_logits(m.float(), torch.full_like(m, target, dtype=torch.float32))
        for m in outputs
    ]
    return torch.stack(losses).sum()


def _disc(disc: nn.Module, x: torch.Tensor, generator: torch.Generator | None):
    return disc(x) if generator is None else disc(x, generator=generator)


def d_loss_real(disc: nn.Module, real: torch.Tensor, *, label: float = REAL_LABEL,
                generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Discriminator loss on real images: BCE(D(real), 0.8). ``real`` is detached."""
    return _bce(_disc(disc, real.detach(), generator), label)


def d_loss_fake(
    disc: nn.Module, fake: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Discriminator loss on generated images: BCE(D(fake), 0). ``fake`` is detached."""
    return _bce(_disc(disc, fake.detach(), generator), 0.0)


class DLoss(NamedTuple):
    """The discriminator's two loss terms; a term is None when its images were not given."""

    real: torch.Tensor | None
    fake: torch.Tensor | None

    @property
    def total(self) -> torch.Tensor:
        """The sum of the terms that were computed."""
        terms = [t for t in (self.real, self.fake) if t is not None]
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def d_loss(
    disc: nn.Module,
    real: torch.Tensor | None,
    fake: torch.Tensor | None,
    *,
    label: float = REAL_LABEL,
) -> DLoss:
    """Discriminator loss terms ``(real, fake)``: BCE(D(real), 0.8) and BCE(D(fake.detach()), 0).

    ``.total`` is their sum. Either input may be None (its term is then None, and not computed):
    S3Diff steps the discriminator on the two terms separately, ``d_loss(D, hr, None).real`` then
    ``d_loss(D, None, sr).fake``."""
    if real is None and fake is None:
        raise ConfigError("d_loss needs real or fake images (both are None)")
    return DLoss(
        None if real is None else d_loss_real(disc, real, label=label),
        None if fake is None else d_loss_fake(disc, fake),
    )


def g_loss(disc: nn.Module, fake: torch.Tensor, *, label: float = REAL_LABEL,
           generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Generator loss: BCE(D(fake), 0.8), differentiable w.r.t. ``fake``.

    Compute it inside ``with frozen(disc):`` so that its backward leaves the discriminator's
    ``.grad`` untouched."""
    return _bce(_disc(disc, fake, generator), label)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Set ``requires_grad=False`` on all of ``module``'s parameters for the block, then restore the flags.

    What counts is the forward pass: a loss computed inside the block builds no graph to the
    module's parameters, so its backward (inside or after the block) reaches only the inputs."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
