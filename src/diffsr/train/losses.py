"""Training losses: LPIPS, PiSA-SR's classifier score distillation (CSD), and a vision-aided GAN.

* :class:`LPIPSLoss` wraps the ``lpips`` package (frozen).
* :func:`csd_loss` is PiSA-SR's CSD in its official latent-space form: a frozen SD UNet's
  classifier-free-guidance direction, turned into a stop-gradient MSE target for the student's latents.
* :class:`VisionAidedDiscriminator` is a frozen DINO ViT with trainable spectral-norm conv heads on
  several blocks' token maps (the idea of Kumari et al.'s vision-aided GAN, as S3Diff uses it), with
  :func:`d_loss` / :func:`g_loss` (BCE, real label smoothed to 0.8) and :func:`frozen`.

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

from diffsr.errors import ConfigError, WeightsNotFoundError

__all__ = [
    "REAL_LABEL",
    "DLoss",
    "LPIPSLoss",
    "VisionAidedDiscriminator",
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

    def __init__(self, net: str = "vgg", pretrained: bool = True) -> None:
        super().__init__()
        if net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"LPIPS net must be 'vgg', 'alex' or 'squeeze', got {net!r}")
        try:
            import lpips
        except ImportError:
            raise ConfigError(f"LPIPSLoss needs the lpips package: {INSTALL_HINT}") from None
        with warnings.catch_warnings():
            # lpips still calls torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            try:
                model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
            except OSError as e:  # URLError is an OSError: backbone weights not cached, no network
                raise WeightsNotFoundError(
                    f"LPIPS {net} backbone weights (torchvision) could not be loaded or downloaded: {e}; "
                    f"put them in {torch.hub.get_dir()}/checkpoints"
                ) from None
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
# vision-aided discriminator


class VisionAidedDiscriminator(nn.Module):
    """A frozen pretrained ViT (DINO ViT-B/16 by default) with trainable conv heads on several blocks.

    Inputs in [-1, 1] ``(B, 3, H, W)`` are mapped to [0, 1], resized (bilinear, antialiased) to
    ``img_size`` squared and normalised with the backbone's mean/std; the token maps (NCHW, prefix
    tokens dropped) of blocks ``layers`` each go through spectral-norm Conv3x3 → LeakyReLU(0.2) →
    spectral-norm Conv1x1 to one logit map. The backbone never trains (eval mode and
    requires_grad False, whatever ``train()`` says) but passes gradients to the input.

    ``state_dict()`` includes the backbone; :meth:`trainable_parameters` lists the heads only.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224.dino",
        pretrained: bool = True,
        layers: Sequence[int] = (0, 4, 11),
        head_channels: int = 256,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ConfigError(f"VisionAidedDiscriminator needs the timm package: {INSTALL_HINT}") from None
        try:
            model = timm.create_model(backbone, pretrained=pretrained, num_classes=0, img_size=img_size)
        except OSError as e:  # not in the HF cache and no network
            raise WeightsNotFoundError(
                f"discriminator backbone {backbone!r}: pretrained weights not found ({type(e).__name__}); "
                "download them once with network access (timm / Hugging Face cache) or pass pretrained=False"
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
        if not idx or len(set(idx)) != len(idx):
            raise ConfigError(f"discriminator layers must be distinct block indices, got {tuple(layers)}")
        self.layers = tuple(idx)
        self.img_size = int(img_size)
        self.backbone = model.eval().requires_grad_(False)

        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        info = getattr(model, "feature_info", None)
        if isinstance(info, list) and len(info) == depth and all("num_chs" in f for f in info):
            chans = [int(info[k]["num_chs"]) for k in idx]
        else:
            chans = [int(model.embed_dim)] * len(idx)
        sn = nn.utils.parametrizations.spectral_norm
        self.heads = nn.ModuleList(
            nn.Sequential(
                sn(nn.Conv2d(c, head_channels, 3, padding=1)),
                nn.LeakyReLU(0.2),
                sn(nn.Conv2d(head_channels, 1, 1)),
            )
            for c in chans
        )

    def train(self, mode: bool = True) -> VisionAidedDiscriminator:
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The heads' parameters (the backbone is frozen)."""
        return list(self.heads.parameters())

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's token maps (B, C, h, w) of ``self.layers``, in that order."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"discriminator input must be (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = (x.float() + 1.0) * 0.5
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x - self.mean) / self.std
        order = sorted(self.layers)
        feats = self.backbone.forward_intermediates(
            x.to(_module_dtype(self.backbone)),
            indices=order,
            output_fmt="NCHW",
            intermediates_only=True,
            stop_early=True,
        )
        by_layer = dict(zip(order, feats, strict=True))
        return [by_layer[k] for k in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) → one logit map (B, 1, h, w) per layer."""
        out = []
        for head, f in zip(self.heads, self.features(x), strict=True):
            w = head[0].parametrizations.weight.original
            out.append(head(f.to(w.dtype)))
        return out


def _bce(maps: Sequence[torch.Tensor], target: float) -> torch.Tensor:
    """BCE with logits against a constant target, averaged over each map, then over the maps."""
    losses = [
        F.binary_cross_entropy_with_logits(m.float(), torch.full_like(m, target, dtype=torch.float32))
        for m in maps
    ]
    return torch.stack(losses).mean()


def d_loss_real(disc: nn.Module, real: torch.Tensor, *, label: float = REAL_LABEL) -> torch.Tensor:
    """Discriminator loss on real images: BCE(D(real), 0.8). ``real`` is detached."""
    return _bce(disc(real.detach()), label)


def d_loss_fake(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on generated images: BCE(D(fake), 0). ``fake`` is detached."""
    return _bce(disc(fake.detach()), 0.0)


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


def g_loss(disc: nn.Module, fake: torch.Tensor, *, label: float = REAL_LABEL) -> torch.Tensor:
    """Generator loss: BCE(D(fake), 0.8), differentiable w.r.t. ``fake``.

    Compute it inside ``with frozen(disc):`` so that its backward leaves the discriminator's
    ``.grad`` untouched."""
    return _bce(disc(fake), label)


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
