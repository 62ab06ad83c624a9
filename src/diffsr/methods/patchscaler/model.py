"""PatchScaler inference: VAE → GRM (coarse latent + confidence) → PGS with Patch-DiT and the texture
prompt → VAE decoder → wavelet colour fix (paper §3, Fig. 2).

Where the paper is silent, the defaults are PATCHSCALER.md's recommendations; each is a config field
and is marked `our choice (D#)` below.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import checkpoints
from ...color import color_fix as apply_color_fix
from ...devices import resolve_device, resolve_dtype
from ...errors import CheckpointError, ConfigError, WeightsNotFoundError, hint
from ...sd import SDParts, load_sd_parts, resolve_base
from ..base import LatentSR, vae_dtype_for
from .dit import PRESETS as DIT_PRESETS
from .dit import PatchDiT, PatchDiTConfig, linear_alphas_cumprod
from .grm import GlobalRestorationModule
from .pgs import GroupSpec, PatchGroupSampler
from .texture import ReferenceTextureMemory, TextureClassifier, TextureEncoder

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"  # our choice (D1): the SD VAE, 4 channels, d = 8
ENV_BASE = "DIFFSR_PATCHSCALER_BASE"
ENV_WEIGHTS = "DIFFSR_PATCHSCALER_WEIGHTS"


def weights_help() -> str:
    """How to get PatchScaler weights (built when raised: names the argument or the flag)."""
    return (
        "PatchScaler has no released weights: train them with `diffsr train patchscaler` (docs/training.md) "
        f"and pass {hint('weights=RUN/final', '--weights RUN/final')} or set DIFFSR_PATCHSCALER_WEIGHTS"
    )


@dataclass(frozen=True)
class PatchScalerConfig:
    """Every PatchScaler hyperparameter; the paper's values where it gives them (a.x), ours elsewhere (D#)."""

    # paper a.3/a.4: patches, thresholds, shortcut paths
    patch: int = 16  # V
    thresholds: tuple[float, float] = (0.95, 0.75)  # γ1, γ2
    taus: tuple[int, int, int] = (400, 700, 1000)  # simple, medium, hard
    steps: tuple[int, int, int] = (8, 14, 20)
    stride: int = 12  # our choice (D13): overlap of 4 latent pixels
    fuse_weight: str = "gaussian"  # our choice (D13)
    schedule: str = "linear"  # our choice (D5): DiT's linear β 1e-4 → 0.02, T = 1000; or "scaled_linear" (SD)
    num_timesteps: int = 1000
    texture_k: int = 3  # our choice (D11): the figure's three neighbours
    color_fix: str = "wavelet"  # paper: wavelet colour normalisation against the LR input
    # networks
    grm_widths: tuple[int, ...] = (64, 128, 256)  # our choice (D2)
    grm_blocks: int = 2
    dit: dict = field(default_factory=lambda: asdict(DIT_PRESETS["B/2"]))  # our choice (D8): DiT-B/2
    texture_depth: int = 2  # our choice (D12)
    base: str = DEFAULT_BASE

    def to_dict(self) -> dict:
        return checkpoints.config_to_dict("patchscaler", self)

    @classmethod
    def from_dict(cls, d: dict) -> PatchScalerConfig:
        return checkpoints.config_from_dict(cls, d, "PatchScaler")

    def groups(self) -> tuple[GroupSpec, ...]:
        return tuple(
            GroupSpec(n, t, s)
            for n, t, s in zip(("simple", "medium", "hard"), self.taus, self.steps, strict=True)
        )

    def dit_config(self) -> PatchDiTConfig:
        return PatchDiTConfig(**self.dit)

    def alphas_cumprod(self) -> torch.Tensor:
        if self.schedule == "linear":
            return linear_alphas_cumprod(self.num_timesteps)
        if self.schedule == "scaled_linear":
            from ...sd import alphas_cumprod_from_config

            return alphas_cumprod_from_config({"num_train_timesteps": self.num_timesteps})
        raise ConfigError(f"schedule={self.schedule!r} is not one of linear, scaled_linear")


class PatchScalerNets(nn.Module):
    """The trained parts: GRM, Patch-DiT, texture encoder; plus the frozen texture classifier and RTM."""

    def __init__(self, config: PatchScalerConfig, classifier: TextureClassifier, rtm: ReferenceTextureMemory):
        super().__init__()
        dc = config.dit_config()
        self.grm = GlobalRestorationModule(
            in_channels=dc.in_channels, widths=config.grm_widths, blocks=config.grm_blocks
        )
        self.dit = PatchDiT(dc)
        self.texture_encoder = TextureEncoder(in_channels=dc.in_channels, patch=config.patch, token_patch=dc.patch_size,
                                              dim=dc.prompt_dim, depth=config.texture_depth, heads=dc.heads,
                                              k=config.texture_k)  # fmt: skip
        self.classifier = classifier.freeze()  # frozen, and kept in eval mode when a parent calls train()
        self.rtm = rtm

    def prompts(self, y0: torch.Tensor, k: int) -> torch.Tensor:
        """Texture prompts of coarse patches y0 (n, C, V, V): classifier key → top-k RTM retrieval →
        similarity-aware encoder (timestep-independent) → (n, L, prompt_dim)."""
        with torch.no_grad():
            q = self.classifier.key(y0.float())
        refs, sims, _ = self.rtm.retrieve(q, k=k)
        return self.texture_encoder(refs.to(y0.device, y0.dtype), sims.to(y0.device, y0.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{name}.{k}": v for name in ("grm", "dit", "texture_encoder", "classifier")
               for k, v in getattr(self, name).state_dict().items()}  # fmt: skip
        out["rtm.keys"], out["rtm.values"] = self.rtm.keys, self.rtm.values
        return out


class _PatchDenoiser:
    """Patch-DiT as a PGS denoiser: texture prompts and their per-block cross-attention keys/values are
    computed once per chunk of patches (they do not depend on t) and reused for the chunk's N calls.
    One denoiser serves one call (it is built per call). The sampler passes the same `idx` tensor for
    every step of a chunk, so the chunk is recognised by identity: no device-to-host sync per step."""

    def __init__(self, nets: PatchScalerNets, k: int, dtype: torch.dtype):
        self.nets, self.k, self.dtype = nets, k, dtype
        self._idx: torch.Tensor | None = None  # the chunk whose prompts are cached (kept alive: identity)
        self._cache = None
        self.prompt_patches = 0  # patches whose texture prompt was encoded (for tests and stats)

    def __call__(self, x_t, t, y0, idx):
        if idx is not self._idx:
            prompt = self.nets.prompts(y0.to(self.dtype), self.k)
            self._cache = self.nets.dit.prompt_cache(prompt)
            self._idx = idx
            self.prompt_patches += idx.numel()
        return self.nets.dit(x_t.to(self.dtype), t, y0.to(self.dtype), self._cache).float()


class PatchScaler(LatentSR):
    """A loaded PatchScaler model. Build with `from_pretrained` (a diffsr folder) or `from_parts`."""

    name = "patchscaler"
    default_color_fix = "wavelet"

    def __init__(self, parts: SDParts, config: PatchScalerConfig, nets: PatchScalerNets, *, dtype: torch.dtype,
                 freeze: bool = True):  # fmt: skip
        """freeze=False leaves the networks' modes and gradients alone (validation during training)."""
        self.config = config
        self.vae = parts.vae
        self.unet = None
        self.nets = nets
        self.device = next(self.vae.parameters()).device
        self.dtype = dtype
        if freeze:
            torch.nn.Module.to(self.nets, self.device).eval().requires_grad_(False)
            for m in (self.nets.grm, self.nets.dit, self.nets.texture_encoder):
                torch.nn.Module.to(m, dtype)
        self.nets.rtm = self.nets.rtm.to(self.device)
        self.alphas_cumprod = config.alphas_cumprod()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls, weights=None, *, base=None, device=None, dtype=None, vae_dtype=None
    ) -> PatchScaler:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        src = weights or os.environ.get(ENV_WEIGHTS)
        if not src:
            raise WeightsNotFoundError(weights_help())
        config, nets = load_weights(src)
        folder = resolve_base(base, default=config.base, env=ENV_BASE)
        parts = load_sd_parts(folder, device=dev, dtype=vae_dtype_for(vae_dtype, dt, dev), text_encoder=False)
        return cls.from_parts(parts, config, nets, dtype=dt)

    @classmethod
    def from_parts(
        cls, parts: SDParts, config: PatchScalerConfig, nets: PatchScalerNets, *, dtype=torch.float32
    ):
        parts.unet = parts.text_encoder = parts.tokenizer = None  # PatchScaler uses the SD VAE only
        gc.collect()
        return cls(parts, config, nets, dtype=dtype)

    def save_pretrained(self, folder) -> Path:
        return save_weights(folder, self.config, self.nets)

    # ---------------------------------------------------------------- inference
    def coarse(
        self, lr: torch.Tensor, opts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """lr (1,3,h,w) in [0,1] → (x_up (1,3,4h,4w) [0,1], y_HR, C (latent size), padded pixel size)."""
        h, w = lr.shape[-2:]
        # our choice (D1): bicubic ×4 before the encoder, as StableSR and ResShift do
        x_up = F.interpolate(lr.float(), size=(4 * h, 4 * w), mode="bicubic", align_corners=False).clamp(0, 1)
        ph, pw = (-x_up.shape[-2]) % 8, (-x_up.shape[-1]) % 8
        x = F.pad(x_up * 2 - 1, (0, pw, 0, ph), mode="replicate") if ph or pw else x_up * 2 - 1
        z = self.encode(x, opts)
        y_hr, conf = self.nets.grm(z.to(self.dtype))
        return x_up, y_hr.float(), conf.float(), (4 * h, 4 * w)

    @torch.no_grad()
    def restore(
        self,
        lr: torch.Tensor,
        *,
        seed: int | None = 0,
        chunk_size: int = 64,
        devices: dict | None = None,
        thresholds: tuple[float, float] | None = None,
        unified: bool = False,
        **options,
    ) -> tuple[torch.Tensor, dict]:
        """lr (1,3,h,w) in [0,1] → (SR (1,3,4h,4w) in [0,1] fp32 CPU, info with PGS statistics).

        seed: the global noise map (one map, cropped per patch); devices: {group: device} for the
        paper's multi-GPU split; thresholds: (γ1, γ2) override; unified: every patch takes the hard
        group's path (τ = 1000, N = 20), the baseline PGS accelerates. `seed` also seeds the VAE posterior
        sample when sample_posterior is on, so a seeded run is reproducible end to end."""
        opts = self.options({**options, "seed": seed})
        x_up, y_hr, conf, size = self.coarse(lr.to(self.device), opts)
        c = self.config
        groups = (c.groups()[-1],) if unified else c.groups()
        if devices and unified:  # one group left: it runs where the hard group was placed
            devices = {g.name: devices[g.name] for g in groups if g.name in devices}
        sampler = PatchGroupSampler(groups=groups, thresholds=() if unified else tuple(thresholds or c.thresholds),
                                    patch=c.patch, stride=c.stride, weight=c.fuse_weight, chunk_size=chunk_size,
                                    devices=devices or None)  # fmt: skip
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        denoisers = self._denoisers(devices, home=y_hr.device)
        x0, stats = sampler(denoisers if devices else denoisers["main"], y_hr, conf, self.alphas_cumprod,
                            generator=gen, progress=_call_progress(opts.progress))  # fmt: skip
        y = self.decode(x0, opts)[..., : size[0], : size[1]]
        y = apply_color_fix(y, x_up.to(y.device), opts.color_fix).cpu()
        stats["texture_prompts"] = sum(d.prompt_patches for d in denoisers.values())
        return y, stats

    @torch.no_grad()
    def window_confidence(self, lr: torch.Tensor, **options) -> torch.Tensor:
        """Mean GRM confidence of every V×V window PGS would sample, (M,) float64 (for analysis and for
        choosing thresholds that give a wanted group split)."""
        from .pgs import mean_confidence, split_patches

        _, y_hr, conf, _ = self.coarse(lr.to(self.device), self.options(options))
        _, corners, padded = split_patches(y_hr, self.config.patch, self.config.stride)
        return mean_confidence(conf, corners, self.config.patch, padded)

    @torch.no_grad()
    def group_map(
        self, lr: torch.Tensor, *, thresholds: tuple[float, float] | None = None, **options
    ) -> tuple[list[tuple[int, int]], torch.Tensor, int]:
        """Which group PGS puts each window in: (corners [(y, x)] in latent pixels, group index per
        window (M,) int64 — 0 simple, 1 medium, 2 hard —, window side V in latent pixels)."""
        from .pgs import assign_groups, mean_confidence, split_patches

        _, y_hr, conf, _ = self.coarse(lr.to(self.device), self.options(options))
        _, corners, padded = split_patches(y_hr, self.config.patch, self.config.stride)
        a = mean_confidence(conf, corners, self.config.patch, padded)
        return corners, assign_groups(a, tuple(thresholds or self.config.thresholds)).cpu(), self.config.patch

    def _denoisers(self, devices: dict | None, home: torch.device | None = None) -> dict[str, Callable]:
        if not devices:
            return {"main": _PatchDenoiser(self.nets, self.config.texture_k, self.dtype)}
        home_key = str(home if home is not None else self.device)
        out = {}  # groups the map leaves out run on the latent's (the model's) device
        for dev in {str(resolve_device(d)) for d in devices.values()} | {home_key}:
            nets = self.nets if dev in (home_key, str(self.device)) else _copy_to(self.nets, dev)
            out[dev] = _PatchDenoiser(nets, self.config.texture_k, self.dtype)
        return out


def _call_progress(progress: Callable | None) -> Callable | None:
    """PGS reports denoiser calls; callers of `restore` get the tiling methods' {done, total} events."""
    if progress is None:
        return None
    return lambda ev: progress(
        {"stage": "pgs", "unit": "call", "done": ev["done_calls"], "total": ev["total_calls"]}
    )


def _copy_to(nets: PatchScalerNets, device) -> PatchScalerNets:
    import copy

    other = copy.deepcopy(nets)
    torch.nn.Module.to(other, device)
    other.rtm = other.rtm.to(device)
    return other


# -------------------------------------------------------------------- weights
def save_weights(folder, config: PatchScalerConfig, nets: PatchScalerNets) -> Path:
    """diffsr's format: config.json (+ classifier and RTM sizes) and model.safetensors with every part."""
    cfg = config.to_dict()
    cfg["classifier"] = nets.classifier.config_dict()
    return checkpoints.save_folder(folder, cfg, nets.tensors())


def load_weights(path) -> tuple[PatchScalerConfig, PatchScalerNets]:
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{path}: no such folder. {weights_help()}")
    cfg, tensors = checkpoints.load_folder(path, method="patchscaler")
    cls_cfg = cfg.pop("classifier", None)
    if cls_cfg is None:
        raise CheckpointError(f"{path}: PatchScaler weights lack the texture classifier's config")
    config = PatchScalerConfig.from_dict(cfg)
    classifier = TextureClassifier.from_config_dict(cls_cfg)
    rtm = ReferenceTextureMemory(
        keys=tensors.pop("rtm.keys").float(), values=tensors.pop("rtm.values").float()
    )
    nets = PatchScalerNets(config, classifier, rtm)
    groups: dict[str, dict] = {}
    for k, v in tensors.items():
        g, _, rest = k.partition(".")
        groups.setdefault(g, {})[rest] = v
    for g in ("grm", "dit", "texture_encoder", "classifier"):
        try:
            getattr(nets, g).load_state_dict(groups.get(g, {}), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: {g} weights do not fit: {str(e).splitlines()[0][:200]}") from None
    return config, nets


def random_nets(
    config: PatchScalerConfig, *, seed: int = 0, rtm_size: int = 64, classifier_widths=(16, 32, 32, 32)
):
    """PatchScaler networks with random weights and a random texture memory (tests and benchmarks:
    real shapes and costs, meaningless outputs). The DiT's zero-initialised gates are randomised too,
    so that every part (coarse latent, texture prompt) changes the output."""
    g = torch.manual_seed(seed)
    dc = config.dit_config()
    classifier = TextureClassifier(in_channels=dc.in_channels, num_classes=8, widths=classifier_widths)
    keys = F.normalize(torch.randn(rtm_size, classifier.config["feature_dim"], generator=g), dim=1)
    values = torch.randn(rtm_size, dc.in_channels, config.patch, config.patch, generator=g)
    nets = PatchScalerNets(
        config, classifier, ReferenceTextureMemory(keys=keys, values=values, k=config.texture_k)
    )
    with torch.no_grad():
        for p in nets.dit.parameters():
            if p.abs().sum() == 0:  # adaLN-Zero / g(t) / final layer start at zero
                p.normal_(0, 0.02, generator=g)
    return nets
