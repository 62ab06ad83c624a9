"""PatchScaler's Global Restoration Module (GRM) and its confidence-driven loss (paper §3.1, Eq. 1).

The GRM maps the (bicubic-upsampled, encoded) LR latent y_LR ∈ R^{c×h×w} to a coarse HR latent
y_HR of the same size and a confidence map C ∈ (0, 1)^{1×h×w}. The paper fixes only the inputs,
outputs and the loss; the architecture is ours (PATCHSCALER.md D2): a latent-space hourglass U-Net
whose blocks are residual conv units, followed by Restormer-style MDTA units (multi-Dconv head
transposed attention: attention across channels, whose C×C attention map is built from all pixels,
so the receptive field is global at any input size and the cost is linear in h·w).

Loss (PATCHSCALER.md a.2 and D3), with e² = Σ_c (y − x)² per pixel:

    L = mean|y − x| + λ · mean_pixels( C·e² − η·log(C + eps) )

Per pixel the C-term is minimised at C* = min(1, η/e²) on (0, 1], so η is the squared error below
which a pixel counts as fully confident (`optimal_confidence`, `calibrate_eta`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError

ATTENTION_MODES = ("mdta", "bottleneck", "none")
GROUPS = ("simple", "medium", "hard")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) map. Unlike GroupNorm it does not
    depend on the image size or on the padded border, which matters for arbitrary input sizes."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ResidualUnit(nn.Module):
    """x + conv3×3(GELU(conv3×3(LN(x)))): the local (texture-scale) part of a GRM block."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(self.norm(x))))


class TransposedAttention(nn.Module):
    """Restormer-style MDTA unit, written from the paper's description (Zamir et al., CVPR 2022):
    q, k, v from a 1×1 conv followed by a depthwise 3×3 conv; per head, q and k (each (C/heads, H·W))
    are L2-normalised along the pixels and the (C/heads)×(C/heads) map softmax(τ·q kᵀ) mixes the
    channels of v. Every pixel contributes to the map, hence a global receptive field at any size.
    Residual form: x + proj(attn(LN(x)))."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"GRM attention: width {channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = LayerNorm2d(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.qkv_dw = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(self.norm(x))).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        out = (attn @ v).reshape(b, c, h, w)
        return x + self.proj(out)


class GRMBlock(nn.Module):
    """One residual unit, then (where this level has attention) one transposed-attention unit."""

    def __init__(self, channels: int, heads: int, attention: bool):
        super().__init__()
        self.local = ResidualUnit(channels)
        self.attn = TransposedAttention(channels, heads) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local(x)
        return self.attn(x) if self.attn is not None else x


class GlobalRestorationModule(nn.Module):
    """Latent hourglass U-Net: y_LR (B, C, h, w) → (y_HR, C) with y_HR = y_LR + Δ and C = sigmoid(·).

    Args (keyword or positional):
        in_channels: latent channels c (4 for the SD VAE, PATCHSCALER.md a.1).
        widths: channels per level, one level per entry (3 levels by default; D2).
        blocks: GRMBlocks per level, in the encoder and again in the decoder.
        heads: attention heads per level (each width must divide by its heads).
        attention: "mdta" — MDTA units at every level; "bottleneck" — only at the lowest level (the
            minimum that still gives a global receptive field); "none" — no attention (ablation).

    Any h, w ≥ 1 works: the input is padded (reflect where the size allows it, otherwise replicate)
    to a multiple of 2**(levels−1) and both outputs are cropped back. The padded pixels take part in
    the global channel attention; reflect/replicate keeps their statistics close to the image's.
    """

    def __init__(
        self,
        in_channels: int = 4,
        widths: tuple[int, ...] = (64, 128, 256),  # our choice (PATCHSCALER.md D2)
        blocks: int = 2,  # our choice (PATCHSCALER.md D2)
        heads: tuple[int, ...] = (1, 2, 4),  # our choice (PATCHSCALER.md D2)
        attention: str = "mdta",  # our choice (PATCHSCALER.md D2)
    ):
        super().__init__()
        widths, heads = tuple(int(w) for w in widths), tuple(int(h) for h in heads)
        if in_channels < 1:
            raise ConfigError(f"GlobalRestorationModule: in_channels={in_channels} must be ≥ 1")
        if not widths or min(widths) < 1:
            raise ConfigError(f"GlobalRestorationModule: widths={widths} needs ≥ 1 positive entries")
        if len(heads) != len(widths):
            raise ConfigError(
                f"GlobalRestorationModule: heads={heads} needs one entry per level (widths={widths})"
            )
        if blocks < 1:
            raise ConfigError(f"GlobalRestorationModule: blocks={blocks} must be ≥ 1")
        if attention not in ATTENTION_MODES:
            raise ConfigError(
                f"GlobalRestorationModule: attention={attention!r}; use one of {ATTENTION_MODES}"
            )
        self.in_channels, self.widths, self.blocks, self.heads = in_channels, widths, blocks, heads
        self.gradient_checkpointing = False  # training: recompute each stage in the backward pass
        self.attention = attention
        self.levels = len(widths)
        self.multiple = 2 ** (self.levels - 1)
        last = self.levels - 1

        def has_attn(level: int) -> bool:
            return attention == "mdta" or (attention == "bottleneck" and level == last)

        def stage(level: int) -> nn.Sequential:
            return nn.Sequential(
                *(GRMBlock(widths[level], heads[level], has_attn(level)) for _ in range(blocks))
            )

        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.encoders = nn.ModuleList(stage(i) for i in range(last))
        # our choice (PATCHSCALER.md D2): strided 3×3 conv down; nearest ×2 + 3×3 conv up (no
        # checkerboard); skip joined by concatenation and a 1×1 conv.
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(last)
        )
        self.bottleneck = stage(last)
        self.ups = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(last))
        self.fuses = nn.ModuleList(nn.Conv2d(2 * widths[i], widths[i], 1) for i in range(last))
        self.decoders = nn.ModuleList(stage(i) for i in range(last))
        self.out_norm = LayerNorm2d(widths[0])
        self.delta_head = nn.Conv2d(widths[0], in_channels, 3, padding=1)
        self.conf_head = nn.Conv2d(widths[0], 1, 3, padding=1)
        # our choice (PATCHSCALER.md D2): Δ starts at 0, so an untrained GRM passes y_LR through.
        nn.init.zeros_(self.delta_head.weight)
        nn.init.zeros_(self.delta_head.bias)
        nn.init.zeros_(self.conf_head.bias)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph == 0 and pw == 0:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward(self, y_lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y_lr: (B, in_channels, h, w), float, any h, w ≥ 1 → (y_hr (B, in_channels, h, w),
        conf (B, 1, h, w) in (0, 1)), on y_lr's device and dtype."""
        if y_lr.dim() != 4 or y_lr.shape[1] != self.in_channels:
            raise ConfigError(
                f"GlobalRestorationModule: y_lr has shape {tuple(y_lr.shape)}; "
                f"expected (B, {self.in_channels}, h, w)"
            )
        h, w = y_lr.shape[-2:]
        if h < 1 or w < 1:
            raise ConfigError(f"GlobalRestorationModule: y_lr is {h}×{w}; both sides must be ≥ 1")
        run = _checkpointed if self.gradient_checkpointing and torch.is_grad_enabled() else _plain
        x = self.stem(self._pad(y_lr))
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            x = run(enc, x)
            skips.append(x)
            x = down(x)
        x = run(self.bottleneck, x)
        for i in reversed(range(self.levels - 1)):
            x = self.ups[i](F.interpolate(x, scale_factor=2.0, mode="nearest"))
            x = run(self.decoders[i], self.fuses[i](torch.cat([x, skips[i]], dim=1)))
        x = self.out_norm(x)
        delta = self.delta_head(x)[..., :h, :w]
        conf = torch.sigmoid(self.conf_head(x)[..., :h, :w])
        return y_lr + delta, conf


def _plain(module, *args):
    return module(*args)


def _checkpointed(module, *args):
    """Recompute `module` in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module, *args, use_reentrant=False)


def grm_loss(
    y_hr: torch.Tensor,
    x_hr: torch.Tensor,
    conf: torch.Tensor,
    *,
    lam: float = 1.0,  # our choice (PATCHSCALER.md D3)
    eta: float,
    eps: float = 1e-6,  # our choice (PATCHSCALER.md D3)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Confidence-driven GRM loss, paper Eq. (1) in the form of PATCHSCALER.md D3:

        L = mean|y − x| + λ · mean_{b,i,j}( C·e² − η·log(C + eps) ),   e² = Σ_c (y − x)²

    The paper's ‖·‖₁² is read as a plain L1 term (a.8); means replace sums so λ and η do not depend
    on the crop size. η has no default: it sets the squared-error level of "fully confident" in
    latent units, so calibrate it (`calibrate_eta`) for the autoencoder and data at hand.

    y_hr, x_hr: (B, c, h, w); conf: (B, 1, h, w) in (0, 1]. Returns (loss, parts) where loss is a
    scalar with gradients into y_hr and conf, and parts holds detached scalars: "l1", "conf_term"
    (the λ-free bracket), "weighted_err" (mean C·e²), "neg_log_conf" (mean −log(C + eps)),
    "mean_conf", "mean_err2".
    """
    if y_hr.shape != x_hr.shape or y_hr.dim() != 4:
        raise ConfigError(
            f"grm_loss: y_hr {tuple(y_hr.shape)} and x_hr {tuple(x_hr.shape)} must both be (B, c, h, w)"
        )
    b, _, h, w = y_hr.shape
    if tuple(conf.shape) != (b, 1, h, w):
        raise ConfigError(f"grm_loss: conf has shape {tuple(conf.shape)}; expected {(b, 1, h, w)}")
    if not eta > 0:
        raise ConfigError(f"grm_loss: eta={eta} must be > 0 (see calibrate_eta)")
    if lam < 0:
        raise ConfigError(f"grm_loss: lam={lam} must be ≥ 0")
    diff = y_hr - x_hr
    l1 = diff.abs().mean()
    err2 = diff.square().sum(dim=1, keepdim=True)
    weighted = (conf * err2).mean()
    neg_log = -torch.log(conf + eps).mean()
    conf_term = weighted + eta * neg_log
    loss = l1 + lam * conf_term
    parts = {
        "l1": l1.detach(),
        "conf_term": conf_term.detach(),
        "weighted_err": weighted.detach(),
        "neg_log_conf": neg_log.detach(),
        "mean_conf": conf.detach().mean(),
        "mean_err2": err2.detach().mean(),
    }
    return loss, parts


def optimal_confidence(err2: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
    """C* = min(1, η/e²): the minimiser over C ∈ (0, 1] of C·e² − η·log C (set the derivative
    e² − η/C to 0 and clip to the sigmoid's range). e² = 0 gives 1. With the loss's log(C + eps)
    the exact minimiser is η/e² − eps, a difference of eps. Same shape, dtype and device as err2."""
    err2 = torch.as_tensor(err2)
    eta = torch.as_tensor(eta, dtype=err2.dtype, device=err2.device)
    if bool((eta <= 0).any()):
        raise ConfigError(f"optimal_confidence: eta must be > 0, got {eta}")
    if bool((err2 < 0).any()):
        raise ConfigError("optimal_confidence: err2 must be ≥ 0 (a squared error)")
    tiny = torch.finfo(err2.dtype).tiny if err2.is_floating_point() else 1e-30
    return torch.clamp(eta / err2.clamp_min(tiny), max=1.0)


def calibrate_eta(err2_samples: torch.Tensor, *, median_conf: float = 1.0, quantile: float = 0.5) -> float:
    """η for Eq. (1) from per-pixel squared errors e² = Σ_c (y_HR − x_HR)² of a trained-for-a-while
    GRM on a validation split (PATCHSCALER.md D3).

    Rule: η = median_conf · Q(e², quantile). Because C* = min(1, η/e²) decreases in e², the pixel at
    that quantile of e² then gets C* = median_conf exactly, pixels with lower error more. With the
    defaults (quantile 0.5, median_conf 1, D3's recommendation — our choice) the median pixel is
    just fully confident: half of the pixels sit at C = 1, and a pixel is "medium" (C ≤ 0.95) once
    its e² exceeds 1.053·η and "hard" (C ≤ 0.75) beyond 1.333·η. Lower median_conf (e.g. 0.9)
    pushes more windows out of the simple group. The quantile is linear interpolation on sorted
    samples (as torch.quantile, with no size limit).

    err2_samples: any shape, ≥ 0, finite; values at least partly > 0. Returns a Python float.
    """
    if not 0 < median_conf <= 1:
        raise ConfigError(f"calibrate_eta: median_conf={median_conf} must be in (0, 1]")
    if not 0 <= quantile <= 1:
        raise ConfigError(f"calibrate_eta: quantile={quantile} must be in [0, 1]")
    e = torch.as_tensor(err2_samples).detach().reshape(-1).to(torch.float64)
    if e.numel() == 0:
        raise ConfigError("calibrate_eta: err2_samples is empty")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ConfigError("calibrate_eta: err2_samples must be finite and ≥ 0 (squared errors)")
    s = torch.sort(e).values
    pos = quantile * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    q = float(s[lo] + (pos - lo) * (s[hi] - s[lo]))
    if q <= 0:
        raise ConfigError(
            f"calibrate_eta: the {quantile:g}-quantile of err2_samples is 0 (a perfect fit); "
            "use errors from a validation split or a higher quantile"
        )
    return median_conf * q


def _window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window offsets along one axis: every stride, plus a last window snapped to the border so the
    whole extent is covered (our choice, PATCHSCALER.md D13)."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def window_means(conf: torch.Tensor, *, patch: int = 16, stride: int = 16) -> torch.Tensor:
    """A_i = mean of C over each patch×patch window (paper Eq. 2's Avg(C⟨y_0,i⟩)).

    conf: (B, 1, h, w). Returns (B, nh, nw) on conf's device. A side shorter than `patch` gives one
    window covering that whole side (our choice, PATCHSCALER.md D13: the PGS reflect-pads such a
    latent, which leaves the mean close to this one)."""
    if conf.dim() != 4 or conf.shape[1] != 1:
        raise ConfigError(f"window_means: conf has shape {tuple(conf.shape)}; expected (B, 1, h, w)")
    if patch < 1 or stride < 1:
        raise ConfigError(f"window_means: patch={patch} and stride={stride} must be ≥ 1")
    h, w = conf.shape[-2:]
    ph, pw = min(patch, h), min(patch, w)
    pooled = F.avg_pool2d(conf.double(), kernel_size=(ph, pw), stride=1)[:, 0]  # fp64: exact-ish boundaries
    rows = torch.tensor(_window_starts(h, patch, stride), device=conf.device)
    cols = torch.tensor(_window_starts(w, patch, stride), device=conf.device)
    return pooled[:, rows][:, :, cols]


def group_fractions(
    conf: torch.Tensor,
    *,
    patch: int = 16,
    stride: int = 16,
    thresholds: tuple[float, float] = (0.95, 0.75),
) -> dict[str, float]:
    """Fractions of windows in each PGS group (paper Eq. 2), pooled over the batch, for logging:
    simple A ∈ (γ1, 1], medium A ∈ (γ2, γ1], hard A ∈ [0, γ2], with (γ1, γ2) = thresholds.

    A degenerate split (everything simple or everything hard) means η is off (PATCHSCALER.md D3).
    conf: (B, 1, h, w). Returns {"simple": f, "medium": f, "hard": f}, summing to 1."""
    g1, g2 = (float(t) for t in thresholds)
    if not 0 <= g2 < g1 <= 1:
        raise ConfigError(f"group_fractions: thresholds={thresholds} must satisfy 0 ≤ γ2 < γ1 ≤ 1")
    a = window_means(conf, patch=patch, stride=stride).reshape(-1)
    n = a.numel()
    simple = int((a > g1).sum())
    hard = int((a <= g2).sum())
    return {"simple": simple / n, "medium": (n - simple - hard) / n, "hard": hard / n}
