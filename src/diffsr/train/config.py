"""Typed training configurations: dataclasses with the official defaults, loadable from a JSON/TOML
file, overridable by `key=value` strings, and saved as config.json with every run."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, hint


@dataclass
class TrainConfig:
    """Settings common to every method's training."""

    data: list[str] = field(default_factory=list)  # HQ image folders and/or list files (degraded on the fly)
    pairs: list[str] = field(
        default_factory=list
    )  # real LR/HR pairs: folders with lr/ + hr/, or 2-column lists
    pair_scale: int = 4  # HR side / LR side of the pairs
    output_dir: str = ""
    base: str | None = None  # SD base (Hub id or folder); None: the method's default
    init_weights: str | None = None  # start from these method weights (fine-tuning)
    max_steps: int = 1000  # optimizer updates; the run stops by itself
    batch_size: int = 4  # per device
    grad_accum: int = 1
    crop_size: int = 512
    min_size: int | None = None  # skip HQ images whose short side is smaller (else reflect-pad)
    hflip: bool = True
    degradation: str = "pisa"  # a diffsr.degradations preset
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (accelerate)
    gradient_checkpointing: bool = False
    seed: int = 123
    checkpoint_every: int = 500
    keep_last: int = 3
    validate_every: int = 500
    val_data: str | None = None  # folder of HR images; LR made with the same degradation, fixed seeds
    val_pairs: str | None = None  # or real LR/HR pairs (a folder with lr/ + hr/, or a 2-column list)
    val_count: int = 8
    val_crop: int = 512
    log_with: str = "tensorboard"  # "tensorboard" or "csv"
    log_every: int = 10
    num_workers: int = 0
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the trained weights; export it
    lpips_pretrained: bool = True  # False: random LPIPS backbone (tests; no download)
    lpips_weights: str | None = (
        None  # local torchvision backbone file (vgg16-397923af.pth) instead of a download
    )
    sample_posterior: bool = True  # the authors sample the VAE posterior in training

    method: typing.ClassVar[str] = ""

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1) (0 disables the average)")
        if not self.data and not self.pairs:
            raise ConfigError(f"training needs data: HQ image folders or list files ({hint('data=', '--data')}), "
                              f"or real LR/HR pairs ({hint('pairs=', '--pairs')})")  # fmt: skip
        if self.data and self.pairs:
            raise ConfigError(f"use either {hint('data', '--data')} (HQ images, degraded on the fly) or "
                              f"{hint('pairs', '--pairs')} (real LR/HR pairs), not both")  # fmt: skip
        if self.val_data and self.val_pairs:
            raise ConfigError(
                f"use either {hint('val_data', '--val-data')} or {hint('val_pairs', '--val-pairs')}, not both"
            )
        if self.pairs and (self.pair_scale < 1 or self.crop_size % self.pair_scale):
            raise ConfigError(
                f"crop_size={self.crop_size} must be a multiple of pair_scale={self.pair_scale}"
            )
        if not self.output_dir:
            raise ConfigError(f"training needs an output directory ({hint('output_dir=', '-o/--output')})")
        for name in ("max_steps", "batch_size", "grad_accum", "crop_size", "checkpoint_every", "keep_last",
                     "validate_every", "log_every", "pair_scale"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.crop_size % 8:
            raise ConfigError(f"crop_size={self.crop_size} must be a multiple of 8")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is not one of no, fp16, bf16")
        if self.log_with not in ("tensorboard", "csv"):
            raise ConfigError(f"log_with={self.log_with!r} is not one of tensorboard, csv")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass
class PisaTrainConfig(TrainConfig):
    """PiSA-SR: stage 1 trains the pixel LoRA (L2), stage 2 the semantic LoRA (L2 + LPIPS + CSD)."""

    pix_steps: int = 4000  # paper
    sem_steps: int = 8500  # paper
    max_steps: int = 12500  # pix_steps + sem_steps
    rank_pix: int = 4
    rank_sem: int = 4
    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0  # stage 2 only
    lambda_csd: float = 1.0  # stage 2 only
    lpips_net: str = "vgg"
    csd_t_min: int = 20
    csd_t_max: int = 500
    csd_cfg: float = 7.5
    null_text_ratio: float = 0.5
    pos_prompt_csd: str = ""
    neg_prompt_csd: str = (
        "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
        "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg "
        "artifacts, deformed, lowres, over-smooth"
    )
    timestep: int = 1
    degradation: str = "pisa"

    method: typing.ClassVar[str] = "pisa"

    def validate(self) -> None:
        super().validate()
        if self.pix_steps < 0 or self.sem_steps < 0:
            raise ConfigError("pix_steps and sem_steps must be >= 0")
        if self.max_steps != self.pix_steps + self.sem_steps:
            raise ConfigError(
                f"max_steps={self.max_steps} must equal pix_steps + sem_steps = {self.pix_steps + self.sem_steps}"
            )
        if not 0 <= self.csd_t_min < self.csd_t_max <= 1000:
            raise ConfigError(f"CSD timesteps [{self.csd_t_min}, {self.csd_t_max}) must lie in [0, 1000]")
        if not 0 <= self.null_text_ratio <= 1:
            raise ConfigError(f"null_text_ratio={self.null_text_ratio} must be in [0, 1]")


@dataclass
class S3DiffTrainConfig(TrainConfig):
    """S3Diff: L2·2 + LPIPS·5, then a generator GAN term ·0.5 against a vision-aided discriminator."""

    de_net: str | None = None  # the frozen degradation estimator (de_net.pth); env DIFFSR_DE_NET
    max_steps: int = 50000
    learning_rate: float = 2e-5
    grad_accum: int = 4  # authors: batch 4 per GPU x 4 accumulation steps (x 4 GPUs = 64)
    rank_unet: int = 32
    rank_vae: int = 16
    lambda_l2: float = 2.0
    lambda_lpips: float = 5.0
    lambda_gan: float = 0.5
    lpips_net: str = "vgg"
    neg_prob: float = 0.05  # online negatives: negative prompt, target = the LR input
    disc_backbone: str = "vit_base_patch16_224.dino"
    disc_pretrained: bool = True
    disc_weights: str | None = None  # local timm weights of disc_backbone instead of the Hub download
    disc_layers: list[int] = field(
        default_factory=lambda: [4, 8, 11]
    )  # get_intermediate_layers(n=8)[0, 4, -1]
    disc_head_channels: int = 128
    disc_diffaug: bool = True  # DiffAugment color,translation,cutout (vision-aided GAN's default)
    disc_img_size: int = 224
    degradation: str = "s3diff"

    method: typing.ClassVar[str] = "s3diff"

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.neg_prob <= 1:
            raise ConfigError(f"neg_prob={self.neg_prob} must be in [0, 1]")


@dataclass
class PatchScalerTrainConfig(TrainConfig):
    """PatchScaler: GRM with the confidence-driven loss (Eq. 1) for its first phase, Patch-DiT with the
    diffusion loss on the standard x-trajectory (PGS is not used in training), jointly; then GRM frozen."""

    rtm: str | None = None  # texture memory folder from `diffsr build-rtm` (classifier + keys + values)
    max_steps: int = 700000  # paper
    grm_steps: int = 100000  # paper: GRM trained with Eq. (1) only for the first 100K iterations
    batch_size: int = 6  # paper (per GPU: our reading, D4)
    learning_rate: float = 5e-5  # paper, Adam, fixed
    weight_decay: float = 0.0  # Adam, not AdamW
    grm_lambda: float = 1.0  # our choice (D3)
    grm_eta: float = (
        0.0  # 0: calibrated on the validation split so the median pixel gets C = 1 (D3); > 0: fixed
    )
    grm_eta_warmup: int = (
        1000  # η is calibrated at step 0 and once more after this many steps (D3: after warm-up)
    )
    dit_preset: str = "B/2"  # our choice (D8)
    grm_widths: list[int] = field(default_factory=lambda: [64, 128, 256])  # our choice (D2)
    grm_blocks: int = 2
    texture_depth: int = 2  # our choice (D12)
    patch: int = 16
    schedule: str = "linear"  # our choice (D5)
    texture_k: int = 3  # (ema_decay, shared by every method: PATCHSCALER.md D17 suggests 0.9999)
    degradation: str = "pisa"  # Real-ESRGAN second order (D18)

    method: typing.ClassVar[str] = "patchscaler"

    def validate(self) -> None:
        super().validate()
        if self.crop_size % (8 * self.patch):
            raise ConfigError(f"crop_size={self.crop_size} must be a multiple of 8·patch = {8 * self.patch}")
        if not 0 <= self.grm_steps <= self.max_steps:
            raise ConfigError(f"grm_steps={self.grm_steps} must be in [0, max_steps={self.max_steps}]")


CONFIGS: dict[str, type[TrainConfig]] = {
    "pisa": PisaTrainConfig,
    "s3diff": S3DiffTrainConfig,
    "patchscaler": PatchScalerTrainConfig,
}


def _coerce(name: str, tp, value):
    """Convert a string (from the command line) or a JSON value to the field type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(name, item, v) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {tp.__name__}") from None
    raise ConfigError(f"{name}: unsupported field type {tp}")


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(method: str, *sources: dict) -> TrainConfig:
    """A method's config from dicts applied in order (file, then overrides); unknown keys are errors."""
    if method not in CONFIGS:
        raise ConfigError(f"no training for method {method!r}; available: {', '.join(CONFIGS)}")
    cls = CONFIGS[method]
    types_ = _field_types(cls)
    values: dict = {}
    for src in sources:
        for k, v in src.items():
            if k == "method":
                if v != method:
                    raise ConfigError(f"config is for method {v!r}, not {method!r}")
                continue
            if k not in types_:
                raise ConfigError(f"unknown {method} training setting {k!r}")
            values[k] = _coerce(k, types_[k], v)
    if method == "pisa" and "max_steps" not in values:
        values["max_steps"] = values.get("pix_steps", 4000) + values.get("sem_steps", 8500)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def read_config_file(path: str | os.PathLike) -> dict:
    """A JSON or TOML file of settings."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(p.read_text())
        return json.loads(p.read_text())
    except (ValueError, ImportError) as e:
        raise ConfigError(f"{p}: cannot parse ({e})") from None


def parse_overrides(items: list[str]) -> dict:
    """['a=1', 'b=x'] → {'a': '1', 'b': 'x'} (typed later by build_config)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        out[key.strip().replace("-", "_")] = value
    return out
