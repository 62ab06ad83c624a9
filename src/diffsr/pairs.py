"""Make LR/HR pair sets from folders of HR images (for evaluation and validation sets).

Each image gets its own seed, derived from the run seed and its relative path, so a pair set can
be remade byte for byte and adding an image to the folder does not change the others."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import torch

from .errors import ConfigError, DiffSRError
from .io import ImageData, find_images, read_image, write_image

PRESET_CHOICES = ("pisa", "s3diff", "bicubic")


def image_seed(seed: int, rel: PurePath) -> int:
    """A 63-bit seed from the run seed and the image's relative path (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{rel.as_posix()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class PairReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def degrade_image(
    hr: np.ndarray, preset: str, seed: int, scale: int = 4, device: str = "cpu"
) -> tuple[np.ndarray, dict]:
    """hr (H, W, 3) float32 in [0, 1], H and W multiples of `scale` → (lr (H/s, W/s, 3) float32, params).

    'bicubic': Pillow's antialiased bicubic downscale (params {}); 'pisa' / 's3diff': the Real-ESRGAN
    second-order model with that preset, seeded by `seed`."""
    h, w = hr.shape[:2]
    if preset == "bicubic":
        from .resize import pil_resize

        x = torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1)))[None]
        lr = pil_resize(x, (h // scale, w // scale), "bicubic").clamp(0, 1)
        return lr[0].permute(1, 2, 0).numpy(), {}
    from .degradations import degrade, get_preset, sample_params

    cfg = get_preset(preset)
    if cfg.scale != scale:
        raise ConfigError(f"preset {preset!r} has scale {cfg.scale}, not {scale}")
    g = torch.Generator().manual_seed(seed)
    params = sample_params(cfg, 1, g)
    x = torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1)))[None].to(device)
    lr = degrade(x, params, cfg)
    return lr[0].permute(1, 2, 0).cpu().numpy(), params[0]


def make_pairs(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    preset: str = "pisa",
    seed: int = 0,
    scale: int = 4,
    device: str = "cpu",
    overwrite: bool = False,
    max_pixels: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PairReport:
    """Write out_dir/hr/<rel>.png (HR cropped to a multiple of `scale`), out_dir/lr/<rel>.png (1/scale)
    and out_dir/params.jsonl (one line per image: relative path, seed, sampled parameters)."""
    if preset not in PRESET_CHOICES:
        raise ConfigError(f"preset {preset!r} is not one of {', '.join(PRESET_CHOICES)}")
    out = Path(out_dir)
    report = PairReport()
    lines = []
    for src, rel in find_images(inputs):
        key = rel.as_posix()
        if progress:
            progress(key)
        hr_path, lr_path = out / "hr" / f"{key}.png", out / "lr" / f"{key}.png"
        s = image_seed(seed, rel)
        try:
            img = read_image(src, max_pixels=max_pixels)
            px = img.pixels if img.pixels.shape[-1] == 3 else np.repeat(img.pixels, 3, axis=-1)
            hh, ww = px.shape[0] - px.shape[0] % scale, px.shape[1] - px.shape[1] % scale
            if hh < scale or ww < scale:
                raise ConfigError(f"{src}: {px.shape[1]}x{px.shape[0]} is smaller than the scale {scale}")
            hr = np.ascontiguousarray(px[:hh, :ww])
            lr, params = degrade_image(hr, preset, s, scale, device)
            lines.append({"image": key, "seed": s, "preset": preset, "params": params})
            if hr_path.exists() and lr_path.exists() and not overwrite:
                report.skipped.append(key)
                continue
            write_image(hr_path, ImageData(hr, None, 8), overwrite=True)
            write_image(lr_path, ImageData(lr.astype(np.float32), None, 8), overwrite=True)
            report.written.append(key)
        except DiffSRError as e:
            report.failed[key] = str(e)
        except Exception as e:  # one bad image must not end the run
            report.failed[key] = f"{src}: {type(e).__name__}: {e}"
    if lines:
        from .checkpoints import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        atomic_write(out / "params.jsonl", lambda p: Path(p).write_text(text))
    return report
