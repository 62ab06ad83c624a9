"""Random-weight Stable Diffusion models of known shapes, for tests and benchmarks.

No pretrained weights can be downloaded on every machine; these let the whole pipeline run (and
be timed) anywhere. `"sd21"` has the exact shapes of SD 2.1-base / SD-Turbo (UNet 866 M params);
`"tiny"` keeps the SD structure (4-level VAE, factor 8; cross-attention UNet) at a size where a whole
encode → UNet → decode takes milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .sd import SDParts, alphas_cumprod_from_config

SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

CONFIGS: dict[str, dict[str, dict]] = {
    "sd21": {
        "unet": dict(
            act_fn="silu",
            attention_head_dim=[5, 10, 20, 20],
            block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=1024,
            down_block_types=[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            in_channels=4,
            layers_per_block=2,
            mid_block_scale_factor=1,
            norm_eps=1e-5,
            norm_num_groups=32,
            out_channels=4,
            sample_size=64,
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            use_linear_projection=True,
        ),
        "vae": dict(
            act_fn="silu",
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=768,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_act="gelu",
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            projection_dim=512,
            max_position_embeddings=77,
            vocab_size=49408,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
    },
    "tiny": {
        "unet": dict(
            block_out_channels=[32, 64],
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=[2, 4],
            cross_attention_dim=32,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            in_channels=4,
            out_channels=4,
            sample_size=16,
            use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=[8, 16, 16, 16],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            max_position_embeddings=77,
            vocab_size=1000,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte ↔ printable-character map of byte-level BPE (GPT-2 / CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_byte_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a CLIP tokenizer with a byte-level vocab and no merges (514 tokens); needs no download."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"})
    )
    return folder


def random_sd_parts(
    size: str = "tiny",
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder: bool = True,
    tokenizer_dir: str | os.PathLike | None = None,
) -> SDParts:
    """Build SD parts with random weights of the `size` config ("tiny" or "sd21") in memory.

    The tokenizer is the byte-level one (written to `tokenizer_dir`, a temporary folder if None).
    Outputs of random weights are meaningless; shapes, costs and code paths are real."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = CONFIGS[size]
    torch.manual_seed(seed)
    # nn.Module.to: diffusers' ModelMixin.to only adds a warning about fp32 modules SD doesn't have
    unet = nn.Module.to(UNet2DConditionModel(**cfg["unet"]), device, dtype).eval().requires_grad_(False)
    vae = nn.Module.to(AutoencoderKL(**cfg["vae"]), device, dtype).eval().requires_grad_(False)
    te = tok = None
    if text_encoder:
        import tempfile

        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        te = (
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
            .to(device, dtype)
            .eval()
            .requires_grad_(False)
        )
        tok_dir = tokenizer_dir or tempfile.mkdtemp(prefix="diffsr-tok-")
        tok = CLIPTokenizer.from_pretrained(write_byte_tokenizer(tok_dir))
    return SDParts(unet, vae, te, tok, alphas_cumprod_from_config(SCHEDULER))


def narrow_posterior(vae: nn.Module, logvar: float = -30.0) -> nn.Module:
    """Make the VAE posterior a point (log-variance `logvar`, std e^(logvar/2)): `latent_dist.sample()`
    then equals `.mode()` to ~1e-7, so code that samples (the authors') and code that takes the mode
    (diffsr's default) give comparable outputs on random weights. In place; returns vae."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = logvar
    return vae


def save_sd_parts(parts: SDParts, folder: str | os.PathLike) -> Path:
    """Write parts as a diffusers-format folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/); the
    tokenizer must already be in folder/tokenizer (random_sd_parts(tokenizer_dir=...))."""
    folder = Path(folder)
    parts.unet.save_pretrained(folder / "unet")
    parts.vae.save_pretrained(folder / "vae")
    parts.text_encoder.save_pretrained(folder / "text_encoder")
    _released_text_encoder_keys(folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def _released_text_encoder_keys(folder: Path) -> None:
    """Name the text encoder's tensors as the released SD folders do (`text_model.` prefix): current
    transformers saves them without it and reads both; older ones (the authors' pins) only the prefix."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        sd = load_file(f)
        if not all(k.startswith("text_model.") for k in sd):
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()},
                      f, metadata={"format": "pt"})  # fmt: skip


def write_random_sd_folder(folder: str | os.PathLike, size: str = "tiny", *, seed: int = 0) -> Path:
    """Write a diffusers-format folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) of random weights."""
    folder = Path(folder)
    return save_sd_parts(random_sd_parts(size, seed=seed, tokenizer_dir=folder / "tokenizer"), folder)


def meta_unet(size: str = "sd21") -> torch.nn.Module:
    """The UNet of `size` on the meta device: structure without memory (for module counting)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**CONFIGS[size]["unet"])


def meta_vae(size: str = "sd21") -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**CONFIGS[size]["vae"])
