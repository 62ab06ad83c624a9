"""PiSA-SR: one-step SR with a pixel-level and a semantic-level LoRA on SD 2.1 (paper Eq. 8).

Forward (authors' code): z_L = VAE(x_up); ε = UNet(z_L, t=1, text("")); z_H = z_L − ε; y = VAE⁻¹(z_H).
The pixel LoRA is folded into the UNet weights at load (it is active in every mode); the semantic
LoRA stays a peft adapter that is merged for the default mode (λ_pix = λ_sem = 1: one plain UNet
pass) and unmerged for the adjustable mode, where one batched UNet call computes ε_pix (base+pix)
for one half of the batch and ε_pix+sem for the other half (peft mixed-batch adapters), and

    ε = λ_pix·ε_pix + λ_sem·(ε_pix+sem − ε_pix)                                  (paper Eq. 8)

No second copy of the UNet weights exists in any mode.
"""

from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoints, lora
from ..color import color_fix as apply_color_fix
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, WeightsNotFoundError
from ..latents import tiled_predict
from ..resize import pil_resize
from ..sd import SDParts, encode_prompts, load_sd_parts, resolve_base
from .base import LatentSR, RunOptions, vae_dtype_for

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
ENV_BASE = "DIFFSR_PISA_BASE"
ENV_WEIGHTS = "DIFFSR_PISA_WEIGHTS"
WEIGHTS_HELP = (
    "PiSA-SR's weights (pisa_sr.pkl) are not on the Hugging Face Hub: download them from the link in "
    "the authors' README (github.com/csslc/PiSA-SR) and pass --weights PATH or set DIFFSR_PISA_WEIGHTS"
)
ADAPTERS = ("pix", "sem")
_OFFICIAL_KEY = re.compile(r"\.lora_([AB])\.default_(encoder|decoder|others)_(pix|sem)\.")


@dataclass(frozen=True)
class PisaConfig:
    """Hyperparameters of a PiSA-SR model (saved as config.json next to the weights)."""

    targets_pix: tuple[str, ...]
    targets_sem: tuple[str, ...]
    rank_pix: int = 4
    rank_sem: int = 4
    alpha_pix: float = 8.0  # peft's default lora_alpha, which the authors use (scale alpha/r = 2)
    alpha_sem: float = 8.0
    timestep: int = 1
    prompt: str = ""
    base: str = DEFAULT_BASE

    def to_dict(self) -> dict:
        return checkpoints.config_to_dict("pisa", self)

    @classmethod
    def from_dict(cls, d: dict) -> PisaConfig:
        return checkpoints.config_from_dict(cls, d, "PiSA-SR")


@dataclass
class PisaWeights:
    """The two LoRA sets. Tensor keys as peft names them: '<module>.lora_{A,B}.{pix,sem}.weight'."""

    config: PisaConfig
    pix: dict[str, torch.Tensor] = field(repr=False)
    sem: dict[str, torch.Tensor] = field(repr=False)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write diffsr's format: config.json + model.safetensors."""
        return checkpoints.save_folder(folder, self.config.to_dict(), {**self.pix, **self.sem})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PisaWeights:
        """Read a diffsr folder or the authors' pisa_sr.pkl (safely: tensors and containers only)."""
        path = Path(path).expanduser()
        if path.is_dir():
            cfg, tensors = checkpoints.load_folder(path, method="pisa")
            config = PisaConfig.from_dict(cfg)
            return cls(config, *_split_sets(tensors, path))
        return cls.from_official(path)

    @classmethod
    def from_official(cls, path: str | os.PathLike) -> PisaWeights:
        """The authors' pisa_sr.pkl: module lists per set and location, ranks, LoRA tensors."""
        sd = checkpoints.safe_torch_load(path)
        need = ["lora_rank_unet_pix", "lora_rank_unet_sem", "state_dict_unet"] + [
            f"unet_lora_{loc}_modules_{s}" for s in ADAPTERS for loc in ("encoder", "decoder", "others")
        ]
        if not isinstance(sd, dict) or any(k not in sd for k in need):
            missing = [k for k in need if not isinstance(sd, dict) or k not in sd]
            raise CheckpointError(f"{path}: not a PiSA-SR checkpoint (missing {', '.join(missing[:3])})")
        targets = {
            s: tuple(
                m for loc in ("encoder", "decoder", "others") for m in sd[f"unet_lora_{loc}_modules_{s}"]
            )
            for s in ADAPTERS
        }
        tensors = {}
        for k, v in sd["state_dict_unet"].items():
            new = _OFFICIAL_KEY.sub(lambda m: f".lora_{m.group(1)}.{m.group(3)}.", k)
            if new == k:
                raise CheckpointError(f"{path}: unexpected tensor {k!r} in state_dict_unet")
            tensors[new] = v
        config = PisaConfig(
            targets_pix=targets["pix"],
            targets_sem=targets["sem"],
            rank_pix=int(sd["lora_rank_unet_pix"]),
            rank_sem=int(sd["lora_rank_unet_sem"]),
        )
        return cls(config, *_split_sets(tensors, Path(path)))

    def to_official(self, path: str | os.PathLike) -> Path:
        """Write the authors' pisa_sr.pkl layout (for their scripts)."""
        sd: dict = {"lora_rank_unet_pix": self.config.rank_pix, "lora_rank_unet_sem": self.config.rank_sem}
        for s, targets in (("pix", self.config.targets_pix), ("sem", self.config.targets_sem)):
            for loc in ("encoder", "decoder", "others"):
                sd[f"unet_lora_{loc}_modules_{s}"] = [m for m in targets if lora.location(m) == loc]
        state = {}
        for k, v in {**self.pix, **self.sem}.items():
            module = k.split(".lora_")[0]
            state[
                re.sub(r"\.lora_([AB])\.(pix|sem)\.", rf".lora_\1.default_{lora.location(module)}_\2.", k)
            ] = v
        sd["state_dict_unet"] = state
        path = Path(path)
        checkpoints.atomic_write(path, lambda p: torch.save(sd, p))
        return path


def _split_sets(tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict, dict]:
    sets: dict[str, dict] = {"pix": {}, "sem": {}}
    for k, v in tensors.items():
        m = re.search(r"\.lora_[AB]\.(pix|sem)\.weight$", k)
        if not m:
            raise CheckpointError(
                f"{where}: unexpected tensor {k!r} (expected '<module>.lora_A.pix.weight' etc.)"
            )
        sets[m.group(1)][k] = v
    return sets["pix"], sets["sem"]


def random_weights(unet: torch.nn.Module, *, seed: int = 0, rank: int = 4, std: float = 0.02) -> PisaWeights:
    """PiSA-SR LoRA sets of random values on the authors' 258-module selection of `unet` (for tests
    and benchmarks; B is non-zero so that each set changes the output)."""
    targets = tuple(lora.unet_lora_targets(unet))
    g = torch.Generator().manual_seed(seed)
    sets = {s: lora.random_lora(unet, targets, s, rank, generator=g, std=std) for s in ADAPTERS}
    return PisaWeights(PisaConfig(targets, targets, rank, rank), sets["pix"], sets["sem"])


def preprocess(lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The authors' input preparation. lr: (1, 3, h, w) in [0, 1].

    If a side is < 128 the image is first resized (bicubic) so its short side is 128; then bicubic
    ×4; then Lanczos down to a multiple of 8. Returns (x_up (1, 3, H8, W8) in [0, 1], (4h, 4w))."""
    h, w = lr.shape[-2:]
    x = lr
    if w < 128 or h < 128:
        s = 128 / min(w, h)
        x = pil_resize(x, (int(s * h), int(s * w)), "bicubic")
    hh, ww = x.shape[-2] * 4, x.shape[-1] * 4
    x = pil_resize(x, (hh, ww), "bicubic")
    x = pil_resize(x, (hh - hh % 8, ww - ww % 8), "lanczos")
    return x.clamp(0, 1), (4 * h, 4 * w)


def postprocess(y: torch.Tensor, x_up: torch.Tensor, size: tuple[int, int], color_fix: str) -> torch.Tensor:
    """Colour fix against the upsampled input, then bicubic to exactly 4× the original size.

    (The authors resize back only when the input was enlarged to 128 first; we always return 4×.)"""
    y = apply_color_fix(y.float(), x_up.to(y.device).float(), color_fix)
    if tuple(y.shape[-2:]) != tuple(size):
        y = pil_resize(y, size, "bicubic").clamp(0, 1)
    return y


class PiSASR(LatentSR):
    """A loaded PiSA-SR model. Build with `from_pretrained` (real weights) or `from_parts`."""

    name = "pisa"
    default_color_fix = "adain"

    def __init__(
        self, parts: SDParts, weights: PisaWeights, prompt_embeds: torch.Tensor, *, dtype: torch.dtype
    ):
        """parts: SD UNet and VAE (the LoRA sets are merged in fp32, as the authors do, before the
        UNet is cast to `dtype`); prompt_embeds: (1, 77, D) text embedding of the (empty) prompt."""
        self.config = weights.config
        self.weights = weights
        self.unet, self.vae = parts.unet, parts.vae
        self.device = next(self.unet.parameters()).device
        self.dtype = dtype
        self.prompt_embeds = prompt_embeds.to(self.device, dtype)
        cfg = weights.config
        # nn.Module.to: diffusers' override only adds a warning about fp32 modules SD does not have
        torch.nn.Module.to(self.unet, torch.float32)
        lora.add_lora(self.unet, "pix", cfg.targets_pix, cfg.rank_pix, cfg.alpha_pix)
        lora.load_lora_tensors(self.unet, "pix", weights.pix)
        lora.fold_adapters(self.unet)  # base + pix: active in every mode
        lora.add_lora(self.unet, "sem", cfg.targets_sem, cfg.rank_sem, cfg.alpha_sem)
        lora.load_lora_tensors(self.unet, "sem", weights.sem)
        lora.merge_adapter(self.unet, "sem")  # default mode; unmerged on demand
        self._sem_merged = True
        torch.nn.Module.to(self.unet, dtype).eval().requires_grad_(False)
        self.timestep = torch.tensor([cfg.timestep], device=self.device, dtype=torch.long)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | PisaWeights | None = None,
        *,
        base: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae_dtype: str | torch.dtype | None = None,
    ) -> PiSASR:
        """Load the SD base (Hub id or folder; default SD 2.1-base, or $DIFFSR_PISA_BASE) and the
        PiSA-SR weights (pisa_sr.pkl or a diffsr folder; or $DIFFSR_PISA_WEIGHTS)."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if not isinstance(weights, PisaWeights):
            src = weights or os.environ.get(ENV_WEIGHTS)
            if not src:
                raise WeightsNotFoundError(WEIGHTS_HELP)
            if not Path(src).expanduser().exists():
                raise WeightsNotFoundError(f"{src}: no such file or folder. {WEIGHTS_HELP}")
            weights = PisaWeights.load(src)
        folder = resolve_base(base, default=weights.config.base, env=ENV_BASE)
        parts = load_sd_parts(
            folder, device=dev, dtype=torch.float32, vae_dtype=vae_dtype_for(vae_dtype, dt, dev)
        )
        return cls.from_parts(parts, weights, dtype=dt)

    @classmethod
    def from_parts(
        cls, parts: SDParts, weights: PisaWeights, *, dtype: torch.dtype = torch.float32
    ) -> PiSASR:
        """Build from SD parts in memory (the text encoder embeds the prompt once, then is released)."""
        if parts.text_encoder is None:
            raise ConfigError("PiSA-SR needs the text encoder once, to embed its (empty) prompt")
        emb = encode_prompts(parts.text_encoder, parts.tokenizer, [weights.config.prompt])
        parts.text_encoder = parts.tokenizer = None
        gc.collect()
        return cls(parts, weights, emb, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return self.weights.save(folder)

    # ---------------------------------------------------------------- UNet passes
    def _set_sem_merged(self, merged: bool) -> None:
        # Switching modes merges/unmerges the semantic LoRA in place; in fp32 the round trip is exact
        # to ~1e-7, in fp16/bf16 each switch adds a rounding step (reload for bit-exact results).
        if merged != self._sem_merged:
            if merged:
                lora.merge_adapter(self.unet, "sem")
            else:
                lora.unmerge_all(self.unet)
            self._sem_merged = merged

    def _unet(self, z: torch.Tensor) -> torch.Tensor:
        emb = self.prompt_embeds.expand(z.shape[0], -1, -1)
        return self.unet(z.to(self.dtype), self.timestep, encoder_hidden_states=emb).sample

    def predict_default(self, z: torch.Tensor) -> torch.Tensor:
        """ε with both LoRA sets merged (λ = 1, 1): z (n, 4, h, w) → (n, 4, h, w)."""
        self._set_sem_merged(True)
        return self._unet(z)

    def predict_pair(self, z: torch.Tensor) -> torch.Tensor:
        """[ε_pix, ε_pix+sem] from ONE batched UNet call: z (n, 4, h, w) → (n, 8, h, w)."""
        self._set_sem_merged(False)
        n = z.shape[0]
        with lora.per_sample_adapters(self.unet, ["__base__"] * n + ["sem"] * n):
            eps = self._unet(torch.cat([z, z]))
        return torch.cat([eps[:n], eps[n:]], dim=1)

    # ---------------------------------------------------------------- entry points
    @torch.no_grad()
    def restore(
        self, lr: torch.Tensor, *, lambda_pix: float = 1.0, lambda_sem: float = 1.0, **options
    ) -> tuple[torch.Tensor, dict]:
        """lr (1, 3, h, w) in [0, 1] → (SR (1, 3, 4h, 4w) in [0, 1] fp32 on CPU, info dict).

        λ = (1, 1) runs the merged default mode (one UNet pass); other values the adjustable mode."""
        lp, ls = float(lambda_pix), float(lambda_sem)
        if lp == 1.0 and ls == 1.0:
            opts = self.options(options)
            x_up, size = preprocess(lr.float().cpu())
            z = self.encode(x_up * 2 - 1, opts)
            eps = tiled_predict(self.predict_default, z, **opts.tiling())
            y = self.decode(z - eps, opts)
            return postprocess(y, x_up, size, opts.color_fix).cpu(), {
                "mode": "default",
                "lambda_pix": lp,
                "lambda_sem": ls,
            }
        y = self.adjustable(lr, **options).render(lp, ls)
        return y, {"mode": "adjustable", "lambda_pix": lp, "lambda_sem": ls}

    @torch.no_grad()
    def adjustable(self, lr: torch.Tensor, **options) -> PisaAdjustable:
        """Run the VAE encoder and ONE batched UNet pass; return an object that renders any (λ_pix, λ_sem)
        with only the latent update and the VAE decoder."""
        opts = self.options(options)
        x_up, size = preprocess(lr.float().cpu())
        z = self.encode(x_up * 2 - 1, opts)
        eps = tiled_predict(self.predict_pair, z, **opts.tiling())
        return PisaAdjustable(self, z, eps[:, :4], eps[:, 4:], x_up, size, opts)


@dataclass
class PisaAdjustable:
    """The UNet outputs of one adjustable run; `render` is cheap (no UNet).

    z: z_L (1, 4, h, w); eps_pix, eps_pixsem: (1, 4, h, w) fp32 on the model's device."""

    model: PiSASR
    z: torch.Tensor
    eps_pix: torch.Tensor
    eps_pixsem: torch.Tensor
    x_up: torch.Tensor
    size: tuple[int, int]
    options: RunOptions

    @torch.no_grad()
    def render(
        self, lambda_pix: float = 1.0, lambda_sem: float = 1.0, *, color_fix: str | None = None
    ) -> torch.Tensor:
        """Paper Eq. 8 with the stored ε's, then z_H = z_L − ε, decode, post-process.

        Returns (1, 3, 4h, 4w) in [0, 1], fp32 on CPU."""
        lp, ls = float(lambda_pix), float(lambda_sem)
        eps = lp * self.eps_pix + ls * (self.eps_pixsem - self.eps_pix)
        y = self.model.decode(self.z - eps, self.options)
        return postprocess(y, self.x_up, self.size, color_fix or self.options.color_fix).cpu()
