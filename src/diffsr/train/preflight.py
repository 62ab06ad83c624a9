"""Find every weight file a training run needs before anything heavy starts, so that a missing one
fails in the first seconds, naming the flag that points to a local copy, instead of after the models
are built and a hub client has retried for a minute.

What a run needs: the SD base (``--base``), S3Diff's degradation estimator (``--de-net``) and its
discriminator backbone (``--disc-weights``), PatchScaler's texture memory (``--rtm``), and the LPIPS
backbone (``--lpips-weights``) for PiSA-SR and S3Diff's loss and for validation. A file already in
the torch hub / Hugging Face cache is used; otherwise one quick download is tried (none when
``HF_HUB_OFFLINE=1`` or ``DIFFSR_OFFLINE=1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsNotFoundError, hint
from .config import TrainConfig

LPIPS_URL = "https://download.pytorch.org/models/"
DOWNLOAD_TIMEOUT_S = 15


def offline() -> bool:
    """True when the environment forbids downloads (HF_HUB_OFFLINE or DIFFSR_OFFLINE set to 1/true)."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "DIFFSR_OFFLINE")
    )


def lpips_backbone(net: str, weights: str | None) -> Path | None:
    """The LPIPS backbone file to use: `weights` (must exist), or torchvision's cached copy (fetched
    once into torch hub's cache when allowed). None only never: raises WeightsNotFoundError."""
    from .losses import LPIPS_BACKBONE_FILES

    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsNotFoundError(f"{hint('lpips_weights=', '--lpips-weights ')}{weights}: no such file")
        return Path(weights)
    name = LPIPS_BACKBONE_FILES[net]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return cached
    help_ = (f"LPIPS needs torchvision's {net} backbone ({name}), which is not in {cached.parent}: pass "
             f"{hint('lpips_weights=FILE', '--lpips-weights FILE')} (download it from {LPIPS_URL}{name})")  # fmt: skip
    if offline():
        raise WeightsNotFoundError(help_ + "; downloads are off (HF_HUB_OFFLINE / DIFFSR_OFFLINE)")
    _download(LPIPS_URL + name, cached, help_)
    return cached


def _download(url: str, dest: Path, help_: str) -> None:
    import urllib.request

    from ..checkpoints import atomic_write

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            data = r.read()
    except OSError as e:
        raise WeightsNotFoundError(f"{help_}; the download failed ({type(e).__name__})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda p: Path(p).write_bytes(data))


def disc_backbone(backbone: str, weights: str | None) -> None:
    """Check the discriminator backbone's pretrained weights are at hand: `weights` (must exist), or
    timm's Hugging Face copy in the cache (fetched once when allowed)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsNotFoundError(f"{hint('disc_weights=', '--disc-weights ')}{weights}: no such file")
        return
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:
        raise ConfigError("S3Diff training needs timm: pip install diffsr[train]") from None
    cfg = get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    help_ = (
        f"the discriminator backbone {backbone!r} has no local weights: pass "
        f"{hint('disc_weights=FILE', '--disc-weights FILE')} (timm weights)"
    )
    if not repo:
        if backbone.split(".")[0] not in timm.list_models():
            raise ConfigError(f"discriminator backbone {backbone!r} is not a timm model")
        raise WeightsNotFoundError(help_)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return
    if offline():
        raise WeightsNotFoundError(help_ + f" ({repo} is not in the Hugging Face cache; downloads are off)")
    try:
        hf_hub_download(repo, "model.safetensors", etag_timeout=DOWNLOAD_TIMEOUT_S)
    except Exception as e:
        raise WeightsNotFoundError(f"{help_} ({repo}: {type(e).__name__})") from None


def check(cfg: TrainConfig) -> None:
    """Resolve every weight `cfg` needs, or raise WeightsNotFoundError / ConfigError naming the flag."""
    from ..sd import resolve_base

    if cfg.method == "pisa":
        from ..methods.pisa import DEFAULT_BASE, ENV_BASE
    elif cfg.method == "s3diff":
        from ..methods.s3diff import DEFAULT_BASE, ENV_BASE
    else:
        from ..methods.patchscaler.model import DEFAULT_BASE, ENV_BASE
    resolve_base(cfg.base, default=DEFAULT_BASE, env=ENV_BASE)
    if cfg.init_weights and not Path(cfg.init_weights).exists():
        raise WeightsNotFoundError(
            f"{hint('init_weights=', '--init-weights ')}{cfg.init_weights}: no such file or folder"
        )
    if cfg.method == "s3diff":
        from ..methods.s3diff import ENV_DE_NET, de_net_help

        de_net = cfg.de_net or os.environ.get(ENV_DE_NET)
        if not de_net:
            raise WeightsNotFoundError(de_net_help())
        if not Path(de_net).is_file():
            raise WeightsNotFoundError(f"{hint('de_net=', '--de-net ')}{de_net}: no such file")
        if cfg.disc_pretrained and cfg.lambda_gan > 0:
            disc_backbone(cfg.disc_backbone, cfg.disc_weights)
    if cfg.method == "patchscaler" and not (cfg.rtm and Path(cfg.rtm).is_dir()):
        raise WeightsNotFoundError(
            f"{hint('rtm=', '--rtm ')}{cfg.rtm}: no such texture memory folder (build one with diffsr build-rtm)"
        )
    needs_lpips = cfg.method in ("pisa", "s3diff") or bool(cfg.val_data or cfg.val_pairs)
    if needs_lpips and cfg.lpips_pretrained:
        try:
            lpips_backbone(getattr(cfg, "lpips_net", "vgg"), cfg.lpips_weights)
        except WeightsNotFoundError:
            if cfg.method in ("pisa", "s3diff"):
                raise
            # PatchScaler trains without LPIPS: validation then reports PSNR/SSIM only (said at start)
