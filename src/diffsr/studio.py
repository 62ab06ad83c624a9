"""What the web page does, without the web: models loaded once per method (lazily), one adjustable
PiSA-SR run per upload re-rendered for any (λ_pix, λ_sem) from a cache, S3Diff with its estimated
degradation, PatchScaler with its group map, the CLI command that reproduces a result, and the
lossless PNG that carries the settings. `web.py` is a thin gradio layer over this module, which is
itself a layer over the Python API (`diffsr.api`)."""

from __future__ import annotations

import shlex
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .api import Upscaler, load
from .errors import ConfigError
from .io import ImageData, write_image

# (λ_pix, λ_sem) values of the grid: the paper's Table 1 range (PSNR peaks near λ_pix 0.5, artefacts
# appear beyond ~1.2-1.5)
GRID_VALUES = (0.5, 1.0, 1.3)
GROUP_COLOURS = ((0.2, 0.8, 0.3), (1.0, 0.8, 0.1), (0.9, 0.2, 0.2))  # simple, medium, hard


class ModelPool:
    """Loads each method's model once, on first use (thread-safe), from a loader per method."""

    def __init__(
        self, loaders: Mapping[str, Callable[[], Upscaler]], load_args: Mapping[str, dict] | None = None
    ):
        self._loaders = dict(loaders)
        self._models: dict[str, Upscaler] = {}
        self._lock = threading.Lock()
        self.methods = tuple(self._loaders)
        self.load_args = {m: dict((load_args or {}).get(m, {})) for m in self.methods}  # for CLI commands

    def get(self, method: str) -> Upscaler:
        with self._lock:
            if method not in self._models:
                if method not in self._loaders:
                    raise ConfigError(
                        f"method {method!r} is not served here (served: {', '.join(self.methods)})"
                    )
                self._models[method] = self._loaders[method]()
            return self._models[method]

    @classmethod
    def from_args(
        cls, methods, *, device=None, dtype=None, per_method: Mapping[str, dict] | None = None
    ) -> ModelPool:
        """Loaders calling diffsr.load(method, device=..., dtype=..., **per_method[method])."""
        per_method = {
            m: {k: v for k, v in (per_method or {}).get(m, {}).items() if v is not None} for m in methods
        }
        common = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}

        def loader(m: str) -> Callable[[], Upscaler]:
            return lambda: load(m, **common, **per_method[m])

        return cls({m: loader(m) for m in methods}, {m: {**common, **per_method[m]} for m in methods})


@dataclass
class Result:
    """One output: the image (ImageData, the input's bit depth), the settings that made it, what the
    method reported."""

    image: ImageData
    settings: dict
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.settings.items() if k != "method")


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class PisaSession:
    """One uploaded image: ONE UNet run (the adjustable pair), then any (λ_pix, λ_sem) by latent update
    and VAE decode, with a least-recently-used cache of `cache_size` renders."""

    def __init__(
        self, up: Upscaler, image: ImageData, *, cache_size: int = 16, progress=None, **options: Any
    ):
        """options: the method's run options (recorded in every result's settings); progress: a
        callback for the UNet run (not a setting)."""
        if up.method != "pisa":
            raise ConfigError(f"PisaSession needs a PiSA-SR model, got {up.method!r}")
        self.image = image
        self.options = {k: v for k, v in options.items() if v is not None}
        self.adjustable = up.adjustable(image, progress=progress, **self.options)
        self.default_color_fix = up.model.default_color_fix
        self.cache: OrderedDict[tuple, Result] = OrderedDict()
        self.cache_size = cache_size
        self.renders = 0  # VAE decodes run (cache misses)

    def render(self, lambda_pix: float, lambda_sem: float, *, color_fix: str | None = None) -> Result:
        if color_fix == self.default_color_fix:
            color_fix = None  # the same result; keeps names and commands short
        key = (round(float(lambda_pix), 6), round(float(lambda_sem), 6), color_fix)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        out = self.adjustable.render(key[0], key[1], color_fix=color_fix)
        settings = {"method": "pisa", "lambda_pix": key[0], "lambda_sem": key[1], **self.options}
        if color_fix:
            settings["color_fix"] = color_fix
        result = Result(out, settings, {"mode": "adjustable"})
        self.renders += 1
        self.cache[key] = result
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return result

    def grid(self, values=GRID_VALUES, *, color_fix: str | None = None) -> list[Result]:
        """Renders for every (λ_pix, λ_sem) in values × values, rows λ_pix, columns λ_sem."""
        return [self.render(lp, ls, color_fix=color_fix) for lp in values for ls in values]


def run_s3diff(up: Upscaler, image: ImageData, *, blur=None, noise=None, guidance_scale=None,
               progress=None, **options) -> Result:  # fmt: skip
    """S3Diff on one image; info holds the estimated and the used (blur, noise)."""
    opts = {k: v for k, v in dict(blur=blur, noise=noise, guidance_scale=guidance_scale, **options).items()
            if v is not None}  # fmt: skip
    out, info = up.process(image, progress=progress, **opts)
    return Result(out, {"method": "s3diff", **opts}, info)


def run_patchscaler(up: Upscaler, image: ImageData, *, progress=None, **options) -> tuple[Result, ImageData]:
    """PatchScaler on one image, and a picture of which group each window went to (simple green,
    medium yellow, hard red, over the bicubic-upscaled input) at the output's size."""
    from .api import _rgb_tensor

    opts = {k: v for k, v in options.items() if v is not None}
    out, info = up.process(image, progress=progress, **opts)
    model = up.model
    map_opts = {
        k: v for k, v in opts.items() if k not in ("seed", "unified", "devices", "chunk_size", "thresholds")
    }
    corners, groups, patch = model.group_map(
        _rgb_tensor(image), thresholds=opts.get("thresholds"), **map_opts
    )
    h, w = out.pixels.shape[:2]
    base = out.pixels if out.pixels.shape[-1] == 3 else np.repeat(out.pixels, 3, -1)
    overlay = np.zeros((h, w, 3), np.float32)
    f = 8  # latent → output pixels
    for g in (0, 1, 2):  # harder groups painted last: they win where windows overlap
        for (y, x), gi in zip(corners, groups.tolist(), strict=True):
            if gi == g:
                overlay[y * f : (y + patch) * f, x * f : (x + patch) * f] = GROUP_COLOURS[g]
    picture = ImageData(np.clip(0.45 * base + 0.55 * overlay, 0, 1).astype(np.float32), None, 8)
    return Result(out, {"method": "patchscaler", **opts}, info), picture


def output_name(stem: str, result: Result) -> str:
    """'<stem>_<method>_<setting><value>…_x4.png': the settings in the file name."""
    short = {"lambda_pix": "lp", "lambda_sem": "ls", "blur": "blur", "noise": "noise",
             "guidance_scale": "cfg", "color_fix": "cf", "unified": "unified", "seed": "seed"}  # fmt: skip
    parts = [stem, result.settings["method"]]
    parts += [f"{short[k]}{_fmt(v)}" for k, v in result.settings.items() if k in short]
    return "_".join(parts) + ".png"


def save_result(result: Result, folder: str | Path, stem: str, command: str = "") -> Path:
    """The result as a lossless PNG (16-bit for 16-bit inputs) named by its settings, with the
    settings (and the CLI command) in PNG text chunks. Overwrites a file of the same name."""
    import json

    text = {"Software": "diffsr", "diffsr:settings": json.dumps(result.settings, sort_keys=True)}
    if command:
        text["diffsr:command"] = command
    return write_image(Path(folder) / output_name(stem, result), result.image, overwrite=True, text=text)


_FLAGS = {"lambda_pix": "--lambda-pix", "lambda_sem": "--lambda-sem", "blur": "--blur", "noise": "--noise",
          "guidance_scale": "--guidance-scale", "color_fix": "--color-fix", "seed": "--seed",
          "tile_size": "--tile-size", "tile_overlap": "--tile-overlap", "tile_batch": "--tile-batch",
          "vae_encoder_tile": "--vae-encoder-tile", "vae_decoder_tile": "--vae-decoder-tile",
          "vae_offload": "--vae-offload"}  # fmt: skip
_LOAD_FLAGS = {
    "weights": "--weights",
    "base": "--base",
    "de_net": "--de-net",
    "device": "--device",
    "dtype": "--dtype",
}


def cli_command(result: Result, input_name: str, load_args: Mapping[str, Any] | None = None) -> str:
    """The `diffsr upscale` command that reproduces `result` from the input file."""
    args = ["diffsr", "upscale", input_name, "-o", "out/", "--method", result.settings["method"]]
    for k, v in (load_args or {}).items():
        if k in _LOAD_FLAGS and v is not None:
            args += [_LOAD_FLAGS[k], str(v)]
    for k, v in result.settings.items():
        if k == "unified" and v:
            args.append("--unified")
        elif k in _FLAGS:
            args += [_FLAGS[k], _fmt(v)]
    return " ".join(shlex.quote(a) for a in args)
