"""PiSA-SR: one-step SR with a pixel-level and a semantic-level LoRA on SD 2.1 (paper Eq. 8).

Forward (authors' code): z_L = VAE(x_up); ε = UNet(z_L, t=1, text("")); z_H = z_L − ε; y = VAE⁻¹(z_H).
Both LoRA sets are folded into the UNet weights once, at load, in fp32 (base + pix + sem): the default
mode (λ_pix = λ_sem = 1) is one plain UNet pass. The adjustable mode needs ε_pix (base + pix) too:
the semantic set is also kept as a peft adapter with its B negated ("minus_sem"), and one batched
UNet call computes ε_pix+sem (no adapter) for one half of the batch and ε_pix (with minus_sem) for
the other half (peft mixed-batch adapters, routed per call through a context variable), then

    ε = λ_pix·ε_pix + λ_sem·(ε_pix+sem − ε_pix)                                  (paper Eq. 8)

Nothing is merged or unmerged after load, so a call never changes the weights: every mode gives the
same bits whatever ran before, and threads may share one model. No second copy of the UNet exists.
"""

from __future__ import annotations

import gc
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoints, lora
from ..color import color_fix as apply_color_fix
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, WeightsNotFoundError, hint
from ..latents import tiled_predict
from ..resize import PIL_FILTERS, pil_resize
from ..sd import SDParts, encode_prompts, load_sd_parts, resolve_base
from .base import LatentSR, RunOptions, vae_dtype_for

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
ENV_BASE = "DIFFSR_PISA_BASE"
ENV_WEIGHTS = "DIFFSR_PISA_WEIGHTS"


def weights_help() -> str:
    """Where PiSA-SR's weights come from (built when raised: names the argument or the flag)."""
    return (
        "PiSA-SR's weights (pisa_sr.pkl) are not on the Hugging Face Hub: download them from the link in "
        f"the authors' README (github.com/csslc/PiSA-SR) and pass {hint('weights=PATH', '--weights PATH')} "
        "or set DIFFSR_PISA_WEIGHTS"
    )


ADAPTERS = ("pix", "sem")
MINUS_SEM = "minus_sem"  # the semantic set with B negated: base+pix+sem − sem = base+pix
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


def _negated_b(sem: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The semantic set re-keyed for the minus_sem adapter, with every lora_B negated."""
    out = {}
    for k, v in sem.items():
        out[k.replace(".sem.", f".{MINUS_SEM}.")] = -v if ".lora_B." in k else v
    return out


def random_weights(unet: torch.nn.Module, *, seed: int = 0, rank: int = 4, std: float = 0.02) -> PisaWeights:
    """PiSA-SR LoRA sets of random values on the authors' 258-module selection of `unet` (for tests
    and benchmarks; B is non-zero so that each set changes the output)."""
    targets = tuple(lora.unet_lora_targets(unet))
    g = torch.Generator().manual_seed(seed)
    sets = {s: lora.random_lora(unet, targets, s, rank, generator=g, std=std) for s in ADAPTERS}
    return PisaWeights(PisaConfig(targets, targets, rank, rank), sets["pix"], sets["sem"])


# our rule: the authors' enlargement of small inputs never makes an image larger than this area
MAX_ENLARGED_AREA = 512 * 512


def enlarge_factor(h: int, w: int) -> float:
    """The factor of the authors' first resize: inputs with a side < 128 are enlarged so that the short
    side is 128. Ours adds two bounds for long thin images (the authors' rule turns 300×1 into a
    38400×128 image, 153600×512 at the model): the enlarged area stays ≤ 512² unless the image is
    larger already, and the short side reaches at least 2 px (8 px after ×4). Both leave every input
    with sides ≥ 128, or of area ≤ 128·512 (e.g. 20×300 → 128×1920), exactly as the authors do."""
    short = min(h, w)
    if short >= 128:
        return 1.0
    s = min(128 / short, max(1.0, math.sqrt(MAX_ENLARGED_AREA / (h * w))))
    return max(s, 2 / short)


def exact_uint8(x: torch.Tensor) -> np.ndarray | None:
    """x (1, 3, h, w) in [0, 1] as a uint8 (h, w, 3) array when every value is k/255 (8-bit data),
    else None."""
    q = (x[0] * 255).round()
    if q.min() < 0 or q.max() > 255 or not torch.equal(q / 255, x[0]):
        return None
    return q.to(torch.uint8).permute(1, 2, 0).numpy()


def check_lambdas(lambda_pix: float, lambda_sem: float) -> tuple[float, float]:
    """λ_pix, λ_sem as floats; each must be a finite number (0 allowed)."""
    out = []
    for name, v in (("lambda_pix", lambda_pix), ("lambda_sem", lambda_sem)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={v!r} is not a number") from None
        if not math.isfinite(f):
            raise ConfigError(f"{name}={v!r} must be a finite number")
        out.append(f)
    return out[0], out[1]


def preprocess(lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """`_preprocess_one` on each image of lr (B, 3, h, w): x_up (B, 3, H8, W8), (4h, 4w)."""
    outs = [_preprocess_one(lr[i : i + 1]) for i in range(lr.shape[0])]
    return torch.cat([x for x, _ in outs]), outs[0][1]


def _preprocess_one(lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The authors' input preparation. lr: (1, 3, h, w) in [0, 1], on the CPU.

    Small inputs are first enlarged (bicubic, `enlarge_factor`); then bicubic ×4; then Lanczos down to
    a multiple of 8. 8-bit data (every value k/255) goes through Pillow's uint8 path exactly as the
    authors' PIL images do (Pillow rounds and clips between its horizontal and vertical passes);
    other data (16-bit, float) through the same kernels in float. Returns (x_up (1, 3, H8, W8) in
    [0, 1] float32, (4h, 4w))."""
    from PIL import Image

    h, w = lr.shape[-2:]
    steps = []
    s = enlarge_factor(h, w)
    if s != 1.0:
        h1, w1 = int(s * h), int(s * w)
        steps.append(("bicubic", (h1, w1)))
    else:
        h1, w1 = h, w
    hh, ww = 4 * h1, 4 * w1
    steps += [("bicubic", (hh, ww)), ("lanczos", (hh - hh % 8, ww - ww % 8))]
    u8 = exact_uint8(lr)
    if u8 is not None:
        im = Image.fromarray(u8)
        for method, (th, tw) in steps:
            im = im.resize((tw, th), PIL_FILTERS[method])
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
        return x, (4 * h, 4 * w)
    x = lr
    for method, size in steps:
        x = pil_resize(x, size, method)
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
        lora.add_lora(self.unet, "sem", cfg.targets_sem, cfg.rank_sem, cfg.alpha_sem)
        lora.load_lora_tensors(self.unet, "sem", weights.sem)
        lora.set_active_adapters(self.unet, ["pix", "sem"])  # peft activates only the last one added
        lora.fold_adapters(self.unet)  # base + pix + sem in fp32, for good: the default mode's weights
        lora.add_lora(self.unet, MINUS_SEM, cfg.targets_sem, cfg.rank_sem, cfg.alpha_sem)
        lora.load_lora_tensors(self.unet, MINUS_SEM, _negated_b(weights.sem))
        lora.set_active_adapters(self.unet, [])  # a plain call is the default mode
        lora.route_adapters(self.unet)
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
                raise WeightsNotFoundError(weights_help())
            if not Path(src).expanduser().exists():
                raise WeightsNotFoundError(f"{src}: no such file or folder. {weights_help()}")
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
    def _unet(self, z: torch.Tensor) -> torch.Tensor:
        emb = self.prompt_embeds.expand(z.shape[0], -1, -1)
        return self.unet(z.to(self.dtype), self.timestep, encoder_hidden_states=emb).sample

    def predict_default(self, z: torch.Tensor) -> torch.Tensor:
        """ε with both LoRA sets folded in (λ = 1, 1): z (n, 4, h, w) → (n, 4, h, w)."""
        return self._unet(z)

    def predict_pair(self, z: torch.Tensor) -> torch.Tensor:
        """[ε_pix, ε_pix+sem] from ONE batched UNet call: z (n, 4, h, w) → (n, 8, h, w)."""
        n = z.shape[0]
        with lora.adapter_batch([MINUS_SEM] * n + ["__base__"] * n):
            eps = self._unet(torch.cat([z, z]))
        return torch.cat([eps[:n], eps[n:]], dim=1)

    # ---------------------------------------------------------------- entry points
    @torch.no_grad()
    def restore(
        self, lr: torch.Tensor, *, lambda_pix: float = 1.0, lambda_sem: float = 1.0, **options
    ) -> tuple[torch.Tensor, dict]:
        """lr (1, 3, h, w) in [0, 1] → (SR (1, 3, 4h, 4w) in [0, 1] fp32 on CPU, info dict).

        λ = (1, 1) runs the merged default mode (one UNet pass); other values the adjustable mode."""
        lp, ls = check_lambdas(lambda_pix, lambda_sem)
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
        lp, ls = check_lambdas(lambda_pix, lambda_sem)
        eps = lp * self.eps_pix + ls * (self.eps_pixsem - self.eps_pix)
        y = self.model.decode(self.z - eps, self.options)
        return postprocess(y, self.x_up, self.size, color_fix or self.options.color_fix).cpu()
