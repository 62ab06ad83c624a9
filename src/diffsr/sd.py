"""Loading the Stable Diffusion parts a method needs: from a Hub id, a local folder, or in memory.

A base model is a diffusers-format folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``)
or a Hugging Face Hub id. Hub downloads go through huggingface_hub's cache and fetch only the
files we load (no full checkpoints, no .bin duplicates).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightsNotFoundError, hint

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# Only what we load; the Hub repos also hold single-file checkpoints and .bin duplicates.
_ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_base(base: str | os.PathLike | None, *, default: str, env: str) -> Path:
    """Return a local diffusers-format folder for `base`.

    base None → $env, else `default`. An existing folder is used as is; anything else is taken as
    a Hub id and fetched into (or found in) the huggingface_hub cache. Without network and without
    a cached copy, raise WeightsNotFoundError saying what is missing and how to point to a copy.
    """
    name = str(base) if base is not None else os.environ.get(env) or default
    p = Path(name).expanduser()
    if p.is_dir():
        missing = [s for s in ("unet", "vae", "scheduler") if not (p / s).is_dir()]
        if missing:
            raise WeightsNotFoundError(
                f"{p}: not a diffusers model folder (missing {', '.join(s + '/' for s in missing)})"
            )
        return p
    if not _HUB_ID.match(name):
        raise WeightsNotFoundError(
            f"{name}: no such model folder ({hint('base=PATH', '--base PATH')} or ${env})"
        )
    return _hub_snapshot(name, env=env)


# What a usable snapshot holds: a download cut short leaves some of these missing (or `.incomplete`).
_REQUIRED_FILES = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
)


def _missing_files(folder: Path | None) -> list[str]:
    return (
        list(_REQUIRED_FILES)
        if folder is None
        else [f for f in _REQUIRED_FILES if not (folder / f).is_file()]
    )


def _hub_snapshot(repo_id: str, *, env: str) -> Path:
    """The cached snapshot of `repo_id` when it is complete; else a download, which fetches only
    what is missing (huggingface_hub resumes files cut short), so an interrupted download goes on
    where it stopped instead of failing on the partial copy."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    cached = None
    try:  # a complete cached copy needs no network
        cached = Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if cached is not None and not _missing_files(cached):
        return cached
    try:
        folder, reason = Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS)), ""
    except Exception as e:
        folder, reason = cached, type(e).__name__
    missing = _missing_files(folder)
    if not missing:
        return folder  # type: ignore[return-value]
    state = (
        f"is only partly in the Hugging Face cache ({folder}: no {', '.join(missing)})"
        if folder is not None
        else f"is not in the Hugging Face cache ({HF_HUB_CACHE})"
    )
    raise WeightsNotFoundError(
        f"base model {repo_id!r} {state} and could not be downloaded"
        + (f" ({reason})" if reason else " (offline?)")
        + f"; run again where the Hub is reachable (the download resumes), or pass "
        f"{hint('base=/path/to/folder', '--base /path/to/folder')} or set {env}"
    )


def hub_file(repo_id: str, filename: str, *, env: str, arg: str) -> Path:
    """Fetch one file of a Hub repo through the cache (cached copy first, then network). ``arg``: the
    argument that points to a local copy instead (``"weights"``: ``weights=`` / ``--weights``)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:
        raise WeightsNotFoundError(
            f"{repo_id}/{filename} is not cached and could not be downloaded ({type(e).__name__}); "
            f"download it and pass {hint(arg + '=PATH', '--' + arg.replace('_', '-') + ' PATH')} or set {env}"
        ) from None


@dataclass
class SDParts:
    """The parts of a Stable Diffusion model. `alphas_cumprod`: (T,) float64 from the scheduler betas."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    alphas_cumprod: torch.Tensor


def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 from a diffusers scheduler config, whatever the scheduler class.

    Supports the schedules SD uses: 'scaled_linear' (linear in sqrt β) and 'linear'.
    """
    t = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    kind = cfg.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, t, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, t, dtype=torch.float64)
    else:
        raise WeightsNotFoundError(
            f"scheduler beta_schedule {kind!r} is not supported (scaled_linear, linear)"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def _load_part(folder: Path, sub: str, load):
    """Run one part's loader; any failure (a missing or empty sub-folder, a truncated safetensors
    file, a pickle that will not load, a tensor of the wrong shape) becomes one WeightsNotFoundError
    line naming the sub-folder and the fix, instead of the library's traceback."""
    try:
        return load()
    except Exception as e:
        # safetensors' and pickle's own error types are not OSErrors; anything else is a real bug
        ours = isinstance(e, (OSError, ValueError, RuntimeError, KeyError))
        if not ours and type(e).__module__.split(".")[0] not in ("safetensors", "pickle", "_pickle", "json"):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = lines[0] if lines else type(e).__name__
        if len(reason) > 300:
            reason = reason[:300] + "…"
        raise WeightsNotFoundError(
            f"{folder / sub}: cannot load the base model's {sub} ({type(e).__name__}: {reason}); "
            f"re-download it, or pass {hint('base=', '--base')} a complete diffusers folder"
        ) from None


def load_sd_parts(
    folder: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    text_encoder: bool = True,
) -> SDParts:
    """Load UNet, VAE (and text encoder + tokenizer) from a diffusers-format folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    unet = _load_part(folder, "unet", lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet",
                                                                                 torch_dtype=dtype))  # fmt: skip
    vae = _load_part(folder, "vae", lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae",
                                                                        torch_dtype=vae_dtype or dtype))  # fmt: skip
    te = tok = None
    if text_encoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        te = _load_part(folder, "text_encoder", lambda: CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype))  # fmt: skip
        tok = _load_part(
            folder, "tokenizer", lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        )
        # the text encoder embeds the fixed prompts once and is let go: on the CPU it stays as loaded,
        # memory-mapped (cpu:N would copy it, and copies of freed weights stay in the process's heap)
        te.to(device if torch.device(device).type != "cpu" else "cpu").eval().requires_grad_(False)
    sched = _load_part(folder, "scheduler",
                       lambda: json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))  # fmt: skip
    unet.to(device).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    for sub, part in (("unet", unet), ("vae", vae)):
        own_aligned(part, sorted((folder / sub).glob("*.safetensors")))
    return SDParts(unet, vae, te, tok, alphas_cumprod_from_config(sched))


def own_aligned(module: torch.nn.Module, files: list[Path] = (), alignment: int = 64) -> torch.nn.Module:
    """Give every CPU parameter and buffer of `module` memory of its own, `alignment`-byte aligned.

    diffusers leaves safetensors weights memory-mapped on the CPU, at whatever offset they have in
    the file; CPU kernels take other code paths (and sum in another order) on unaligned data, so the
    same weights gave other bits once copied (`.to("cpu:0")` copies, `.to("cpu")` does not). Owned,
    aligned weights make the result independent of how the model was loaded.

    A tensor stored under its own name in one of the safetensors `files` is read from the file with
    plain reads, not through its mapping: a copy through the mapping leaves the mapped pages resident
    beside the copy until the file's last tensor is let go (PiSA-SR at SD 2.1 size on the CPU: peak
    RSS 6.34 GiB instead of 7.35). Anything else (a renamed or converted tensor) is cloned."""
    stored = _StoredTensors(files)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
            t.data = stored.read(name, t.detach())
    return module


_MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too


class _StoredTensors:
    """Where each tensor of some safetensors files lies (from their JSON headers: 8-byte length, then
    name -> dtype, shape, data_offsets relative to the end of the header), to read it without mmap."""

    def __init__(self, files: list[Path]):
        self.places: dict[str, list[tuple[Path, int, int]]] = {}  # name -> [(file, offset, bytes)]
        for f in files:
            try:  # a file that is not a readable safetensors file (a stray partial download) is passed over
                with open(f, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    header = json.loads(fh.read(size)) if size <= _MAX_HEADER else {}
                spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
            for name, (begin, end) in spans.items():
                self.places.setdefault(name, []).append((f, 8 + size + begin, end - begin))

    def read(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """An owned, aligned copy of `t` (CPU): read from the stored tensor `name` when its size and
        16 sampled values match `t`, else cloned."""
        out = torch.empty(t.shape, dtype=t.dtype)  # PyTorch's CPU allocator aligns to 64 bytes
        nbytes = t.numel() * t.element_size()
        k = min(16, t.numel())
        probe = torch.arange(k) * (t.numel() - 1) // max(k - 1, 1)  # touches <= 16 pages of t
        for path, offset, size in self.places.get(name, []):
            if size != nbytes:
                continue
            with open(path, "rb") as fh:
                fh.seek(offset)
                got = fh.readinto(out.reshape(-1).view(torch.uint8).numpy())
            if got == size and torch.equal(out.reshape(-1)[probe], t.reshape(-1)[probe]):
                return out
        return t.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden state for each prompt: (len(prompts), 77, D), on the encoder's device/dtype.

    Tokenised as the authors do: max_length 77, padding to max_length, truncation."""
    dev = next(text_encoder.parameters()).device
    ids = tokenizer(
        prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(dev))[0]
