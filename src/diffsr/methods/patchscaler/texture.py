"""PatchScaler's texture prompt (paper §3.3, Algorithm 1): texture classifier 𝒯, reference texture
memory (RTM), retrieval, and the similarity-aware texture encoder.

Latent texture patches are SD-VAE latents of 128×128 HR crops, (C, V, V) = (4, 16, 16).

- RTM build (offline): HR crops (`select_texture_crops`) → VAE latents (the caller) → keys =
  Normalize(𝒯(value)) → farthest point sampling keeps `size` (key, value) pairs (`build_rtm`).
- Retrieval (Algorithm 1): s_i = ⟨RTM-key_i, Normalize(𝒯(y0))⟩, top-K indices d^k and similarities
  s^k, texture priors tp^k = RTM-value[d^k] (`ReferenceTextureMemory.retrieve`).
- Transfer: `TextureEncoder` turns (tp^k, s^k) into the prompt that Patch-DiT cross-attends to in
  every block. It has no timestep input, so it runs once per patch, not once per sampling step.

Choices the paper does not fix are marked "our choice (PATCHSCALER.md D#)".
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import checkpoints
from ...errors import CheckpointError, ConfigError

CLASSIFIER_METHOD = "texture-classifier"
RTM_METHOD = "rtm"
FPS_ON = ("key", "key+value")
_FP16_MAX = 65504.0


def _as_int(value, name: str, lo: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an int, got {value!r}") from None
    if lo is not None and v < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {v}")
    return v


# ------------------------------------------------------------------------------------------------
# Texture classifier 𝒯
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class TextureClassifier(nn.Module):
    """𝒯: a small ResNet on latent texture patches (B, C, V, V), any V >= 8 (D9).

    stem conv 3×3 → 4 stages of `blocks_per_stage` residual blocks (the first stage at full
    resolution, each later one halving it: 16 → 16, 8, 4, 2) → global average pool → Linear to the
    `feature_dim` penultimate feature (`features`, the retrieval feature 𝒯(·)) → Linear to
    `num_classes` logits. Keys are the L2-normalised features (`key`).
    """

    def __init__(
        self,
        in_channels: int = 4,
        num_classes: int = 47,  # DTD's 47 classes (D9)
        widths: tuple[int, ...] | list[int] = (64, 128, 256, 256),
        feature_dim: int = 256,
        *,
        blocks_per_stage: int = 2,  # our choice (PATCHSCALER.md D9): ResNet-18-like depth per stage
        norm: str = "batch",  # our choice (PATCHSCALER.md D9): BatchNorm, as in ResNet
    ):
        super().__init__()
        in_channels = _as_int(in_channels, "TextureClassifier in_channels", 1)
        num_classes = _as_int(num_classes, "TextureClassifier num_classes", 1)
        feature_dim = _as_int(feature_dim, "TextureClassifier feature_dim", 1)
        blocks_per_stage = _as_int(blocks_per_stage, "TextureClassifier blocks_per_stage", 1)
        widths = tuple(_as_int(w, "TextureClassifier widths[i]", 1) for w in widths)
        if norm not in NORMS:
            raise ConfigError(f"TextureClassifier norm must be one of {NORMS}, got {norm!r}")
        if len(widths) != 4:
            raise ConfigError(f"TextureClassifier widths must have 4 entries (one per stage), got {widths}")
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, widths
        self.feature_dim, self.blocks_per_stage, self.norm = feature_dim, blocks_per_stage, norm
        self.frozen = False

        # BatchNorm trains this small net much faster and more reliably than GroupNorm (whose
        # per-sample statistics discard contrast cues); its keys depend on the batch only in train
        # mode, so a frozen 𝒯 stays in eval mode (see `freeze`). norm="group" is batch-independent.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), _norm(norm, widths[0]), nn.SiLU()
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [_ResBlock(cin, w, 1 if i == 0 else 2, norm)]
            blocks += [_ResBlock(w, w, 1, norm) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        # our choice (PATCHSCALER.md D9): the penultimate feature is a linear projection of the pooled
        # map (no activation), so keys are not confined to the positive orthant.
        self.project = nn.Linear(widths[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "widths": list(self.widths),
            "feature_dim": self.feature_dim,
            "blocks_per_stage": self.blocks_per_stage,
            "norm": self.norm,
        }

    def freeze(self) -> TextureClassifier:
        """Eval mode and no gradients, kept through later `.train()` calls (e.g. from a parent
        module), so BatchNorm's running statistics neither change nor get replaced by batch ones."""
        self.frozen = True
        super().train(False)
        return self.requires_grad_(False)

    def unfreeze(self) -> TextureClassifier:
        self.frozen = False
        return self.requires_grad_(True)

    def train(self, mode: bool = True) -> TextureClassifier:
        return super().train(mode and not self.frozen)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"TextureClassifier expects latent patches (B, {self.in_channels}, V, V), got {shape}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """𝒯(x): (B, C, V, V) → (B, feature_dim), float, on the model's device."""
        self._check(x)
        p = next(self.parameters())
        h = self.stages(self.stem(x.to(p.device, p.dtype)))
        return self.project(h.mean(dim=(2, 3)))

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize(𝒯(x)): (B, C, V, V) → (B, feature_dim) with unit L2 norm."""
        return F.normalize(self.features(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))

    def save(self, folder: str | os.PathLike) -> Path:
        """diffsr's folder format: config.json (method "texture-classifier") + model.safetensors."""
        return checkpoints.save_folder(
            folder, {"method": CLASSIFIER_METHOD, **self.config}, self.state_dict()
        )

    def config_dict(self) -> dict:
        """The constructor's arguments, JSON-able; `from_config_dict` rebuilds the architecture."""
        return dict(self.config)

    @classmethod
    def from_config_dict(cls, config: dict, *, frozen: bool = True) -> TextureClassifier:
        """The architecture of a saved config (keys "method"/"format_version" ignored) with fresh
        weights, frozen by default because it is there to receive a frozen 𝒯's state dict. A config
        this class cannot build raises CheckpointError."""
        kwargs = {k: v for k, v in dict(config).items() if k not in ("method", "format_version")}
        try:
            model = cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"bad texture-classifier config {kwargs} ({e})") from None
        return model.freeze() if frozen else model

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TextureClassifier:
        """Read a folder written by `save`; returns the model on the CPU, frozen (`freeze`): the
        paper uses 𝒯 pre-trained and frozen. Call `unfreeze()` to fine-tune it."""
        cfg, tensors = checkpoints.load_folder(folder, method=CLASSIFIER_METHOD)
        try:
            model = cls.from_config_dict(cfg)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from None
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(
                f"{folder}: weights do not fit the texture-classifier config ({str(e).splitlines()[0]})"
            ) from None
        return model


def train_classifier(
    classifier: TextureClassifier,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Minimal cross-entropy training of `classifier` on (inputs (N, C, V, V), labels (N,) int64),
    on the classifier's device, AdamW with a cosine learning-rate decay. augment: a random flip and
    90° rotation per batch (texture classes do not change under them). Returns the per-step losses.
    For demos and tests (procedural textures); real training on DTD belongs in a training script."""
    if classifier.frozen:
        raise ConfigError("train_classifier: the classifier is frozen; call classifier.unfreeze() first")
    steps = _as_int(steps, "train_classifier steps", 1)
    batch_size = _as_int(batch_size, "train_classifier batch_size", 1)
    if inputs.ndim != 4 or labels.ndim != 1 or len(inputs) != len(labels) or len(inputs) == 0:
        raise ConfigError(
            f"train_classifier needs inputs (N, C, V, V) and labels (N,), got {tuple(inputs.shape)} and "
            f"{tuple(labels.shape)}"
        )
    device = next(classifier.parameters()).device
    classifier.train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator)
        x = inputs[idx]
        if augment:
            turns, flip = torch.randint(4, (2,), generator=generator).tolist()
            x = torch.rot90(x, turns, dims=(2, 3))
            x = x.flip(3) if flip % 2 else x
        loss = F.cross_entropy(classifier(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
    classifier.eval()
    return losses


# ------------------------------------------------------------------------------------------------
# Farthest point sampling
def farthest_point_sampling(points: torch.Tensor, k: int, *, start: int = 0) -> torch.Tensor:
    """Greedy farthest point sampling [35] on Euclidean distance.

    points (N, D) float; returns int64 indices (k,) on points' device: indices[0] = start, then each
    next index is the point whose distance to the already chosen set is largest (ties → the lowest
    index). Chosen points are never chosen again, so k = N gives a permutation even with duplicate
    points. Vectorised over N: O(N·k·D) work, no host syncs in the loop. Distances are computed as
    Σ(p − q)² in float32 (float64 if the points are float64)."""
    if not isinstance(points, torch.Tensor) or points.ndim != 2:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ConfigError(f"farthest_point_sampling: points must be a 2-D tensor (N, D), got {shape}")
    n = points.shape[0]
    k = _as_int(k, "farthest_point_sampling k", 0)
    start = _as_int(start, "farthest_point_sampling start")
    if k > n:
        raise ConfigError(f"farthest_point_sampling: k = {k} is larger than the number of points N = {n}")
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=points.device)
    if not 0 <= start < n:
        raise ConfigError(f"farthest_point_sampling: start = {start} is outside [0, {n})")
    pts = points.detach().to(torch.float64 if points.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(pts).all():
        raise ConfigError("farthest_point_sampling: points contain NaN or inf")

    out = torch.empty(k, dtype=torch.long, device=pts.device)
    min_d = torch.full((n,), math.inf, dtype=pts.dtype, device=pts.device)
    cur = torch.tensor([start], dtype=torch.long, device=pts.device)
    for i in range(k):
        out[i] = cur[0]
        d = (pts - pts.index_select(0, cur)).square().sum(dim=1)
        torch.minimum(min_d, d, out=min_d)
        min_d.index_fill_(0, cur, -math.inf)  # chosen: never the argmax again
        if i + 1 < k:
            cur = min_d.argmax().view(1)  # torch.argmax returns the first maximum: lowest index wins
    return out


# ------------------------------------------------------------------------------------------------
# Reference texture memory
@dataclass
class ReferenceTextureMemory:
    """RTM: `keys` (K, D) float32 with unit rows (RTM-key) and `values` (K, C, V, V) float32 latent
    texture patches (RTM-value), on one device. `k` is the default number of neighbours (D11: 3).
    `info` is free-form provenance (how the memory was built), saved with it.

    Keys that are not unit-norm are normalised on construction."""

    keys: torch.Tensor
    values: torch.Tensor
    k: int = 3  # our choice (PATCHSCALER.md D11): 3 neighbours, as drawn in the method figure
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.keys, torch.Tensor) or self.keys.ndim != 2:
            raise ConfigError("ReferenceTextureMemory: keys must be a tensor (K, D)")
        if not isinstance(self.values, torch.Tensor) or self.values.ndim != 4:
            raise ConfigError("ReferenceTextureMemory: values must be a tensor (K, C, V, V)")
        if len(self.keys) != len(self.values) or len(self.keys) == 0:
            raise ConfigError(
                f"ReferenceTextureMemory: {len(self.keys)} keys and {len(self.values)} values; need the "
                "same number, at least 1"
            )
        self.k = _as_int(self.k, "ReferenceTextureMemory k", 1)
        keys = self.keys.detach().float()
        norms = keys.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            keys = F.normalize(keys, dim=1)
        self.keys = keys
        self.values = self.values.detach().to(self.keys.device, torch.float32)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    @property
    def value_shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape[1:])

    def to(self, device: torch.device | str) -> ReferenceTextureMemory:
        return ReferenceTextureMemory(self.keys.to(device), self.values.to(device), self.k, dict(self.info))

    def retrieve(
        self, query_keys: torch.Tensor, k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1, steps 3–5. query_keys (B, D) = 𝒯(y0), normalised here (again, for safety);
        k defaults to `self.k`.

        Returns, on the memory's device: values (B, k, C, V, V) float32 = RTM-value[d^k], cosine
        similarities s^k (B, k) float32 sorted descending, indices d^k (B, k) int64. Exact ties are
        ordered as torch.topk orders them."""
        k = self.k if k is None else _as_int(k, "retrieve k", 1)
        if k > len(self):
            raise ConfigError(f"retrieve: k = {k} is larger than the memory ({len(self)} entries)")
        if (
            not isinstance(query_keys, torch.Tensor)
            or query_keys.ndim != 2
            or query_keys.shape[1] != self.key_dim
        ):
            shape = (
                tuple(query_keys.shape) if isinstance(query_keys, torch.Tensor) else type(query_keys).__name__
            )
            raise ConfigError(f"retrieve: query_keys must be (B, {self.key_dim}), got {shape}")
        q = F.normalize(query_keys.detach().to(self.keys.device, torch.float32), dim=1)
        sims = q @ self.keys.T  # (B, K): ⟨RTM-key_i, Normalize(query)⟩
        top = torch.topk(sims, k, dim=1, largest=True, sorted=True)
        return self.values[top.indices], top.values, top.indices

    def save(self, folder: str | os.PathLike) -> Path:
        """config.json (method "rtm", sizes, default k, info) + model.safetensors with keys (float32)
        and values (float16: 2,000 × 4×16×16 is about 2 MB; D10)."""
        if self.values.abs().max() > _FP16_MAX:
            raise ConfigError("ReferenceTextureMemory.save: values exceed the float16 range; rescale them")
        config = {
            "method": RTM_METHOD,
            "size": len(self),
            "key_dim": self.key_dim,
            "value_shape": list(self.value_shape),
            "k": self.k,
            "value_dtype": "float16",
            "info": self.info,
        }
        return checkpoints.save_folder(folder, config, {"keys": self.keys, "values": self.values.half()})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ReferenceTextureMemory:
        """Read a folder written by `save` (on the CPU; values back to float32)."""
        cfg, tensors = checkpoints.load_folder(folder, method=RTM_METHOD)
        if set(tensors) != {"keys", "values"}:
            raise CheckpointError(
                f"{folder}: an RTM holds tensors 'keys' and 'values', found {sorted(tensors)}"
            )
        keys, values = tensors["keys"], tensors["values"]
        try:
            expect_k = (int(cfg["size"]), int(cfg["key_dim"]))
            expect_v = (int(cfg["size"]), *map(int, cfg["value_shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{folder}: RTM config lacks or garbles size/key_dim/value_shape ({e})"
            ) from None
        if tuple(keys.shape) != expect_k or tuple(values.shape) != expect_v:
            raise CheckpointError(
                f"{folder}: RTM tensors keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match "
                f"the config ({expect_k} / {expect_v})"
            )
        try:
            return cls(keys.float(), values.float(), cfg.get("k", 3), dict(cfg.get("info") or {}))
        except ConfigError as e:
            raise CheckpointError(f"{folder}: {e}") from None


@torch.no_grad()
def _keys_of(values: torch.Tensor, classifier: TextureClassifier, batch_size: int) -> torch.Tensor:
    was_training = classifier.training
    classifier.eval()
    try:
        keys = [classifier.key(values[i : i + batch_size]).float() for i in range(0, len(values), batch_size)]
    finally:
        classifier.train(was_training)
    return torch.cat(keys).to(values.device)


def build_rtm(
    values: torch.Tensor,
    classifier: TextureClassifier,
    size: int = 2000,
    *,
    batch_size: int = 256,
    fps_on: str = "key",
    start: int = 0,
    k: int = 3,
) -> ReferenceTextureMemory:
    """Build the RTM from candidate latent texture patches (paper §3.3; D10).

    values (N, C, V, V): e.g. 20,000 VAE latents of HR crops. keys = classifier.key(values) (no grad,
    eval mode, in batches on the classifier's device). Farthest point sampling keeps `size` pairs:
    fps_on="key" (default) samples over the normalised keys; "key+value" over concat[key,
    normalize(flattened value)], both unit-norm so each half weighs the same. The same indices select
    keys and values. Deterministic for a given start index. Returns float32 tensors on values' device.
    """
    if not isinstance(values, torch.Tensor) or values.ndim != 4:
        raise ConfigError("build_rtm: values must be a tensor (N, C, V, V)")
    size = _as_int(size, "build_rtm size", 1)
    batch_size = _as_int(batch_size, "build_rtm batch_size", 1)
    if size > len(values):
        raise ConfigError(f"build_rtm: size = {size} exceeds the {len(values)} candidate patches")
    if fps_on not in FPS_ON:
        raise ConfigError(f"build_rtm: fps_on must be one of {FPS_ON}, got {fps_on!r}")
    values = values.detach().float()
    keys = _keys_of(values, classifier, batch_size)
    # our choice (PATCHSCALER.md D10): "FPS on both RTM-value and RTM-key" read as sampling pairs,
    # by default over the keys alone; fps_on="key+value" is the literal alternative.
    points = keys if fps_on == "key" else torch.cat([keys, F.normalize(values.flatten(1), dim=1)], dim=1)
    idx = farthest_point_sampling(points, size, start=start)  # our choice (D10): fixed start, index 0
    info = {"fps_on": fps_on, "start": start, "candidates": len(values), "classifier": classifier.config}
    return ReferenceTextureMemory(keys[idx], values[idx], k, info)


def select_texture_crops(
    images: torch.Tensor | Iterable[torch.Tensor],
    crop: int = 128,
    per_image: int = 8,  # our choice (PATCHSCALER.md D10): the paper gives only the total (20,000)
    min_std: float = 0.02,  # our choice (PATCHSCALER.md D10): reject near-flat crops
    *,
    generator: torch.Generator | None = None,
    max_tries: int | None = None,
) -> torch.Tensor:
    """Random `crop`×`crop` HR crops for the RTM, rejecting near-flat ones; the caller VAE-encodes them.

    images: a tensor (N, 3, H, W) in [0, 1], or an iterable of (3, H, W) / (n, 3, H, W) tensors
    (sizes may differ). For each image, `max_tries` (default 4·per_image) top-left corners are drawn
    uniformly from the CPU `generator`, and crops are kept in draw order while their pixel standard
    deviation (over all channels and pixels) is >= min_std, up to `per_image`. Images smaller than
    the crop are skipped. Returns (M, 3, crop, crop) float32 on the CPU (M may be 0)."""
    crop = _as_int(crop, "select_texture_crops crop", 1)
    per_image = _as_int(per_image, "select_texture_crops per_image", 1)
    max_tries = (
        4 * per_image if max_tries is None else _as_int(max_tries, "select_texture_crops max_tries", 1)
    )
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ConfigError(
                f"select_texture_crops: a tensor of images must be (N, 3, H, W), got {tuple(images.shape)}"
            )
        images = iter(images)
    out: list[torch.Tensor] = []
    for item in images:
        if not isinstance(item, torch.Tensor) or item.ndim not in (3, 4) or item.shape[-3] != 3:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ConfigError(
                f"select_texture_crops: each image must be (3, H, W) or (n, 3, H, W), got {shape}"
            )
        for img in item.unsqueeze(0) if item.ndim == 3 else item:
            img = img.detach().float().cpu()
            if img.numel() and (img.min() < -1e-3 or img.max() > 1 + 1e-3):
                raise ConfigError(
                    "select_texture_crops: images must be in [0, 1] (got values in "
                    f"[{float(img.min()):.3g}, {float(img.max()):.3g}]); divide 8-bit images by 255"
                )
            h, w = img.shape[-2:]
            if h < crop or w < crop:
                continue
            ys = torch.randint(h - crop + 1, (max_tries,), generator=generator)
            xs = torch.randint(w - crop + 1, (max_tries,), generator=generator)
            kept = 0
            for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
                patch = img[:, y : y + crop, x : x + crop]
                if patch.std() >= min_std:
                    out.append(patch.clone())
                    kept += 1
                    if kept == per_image:
                        break
    if not out:
        return torch.empty(0, 3, crop, crop)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Similarity-aware texture encoder
def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding (grid², dim), row-major token order: the first
    half of the channels encodes the row, the second the column (as in MAE / DiT)."""
    if dim % 4:
        raise ConfigError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    axis = torch.outer(pos, omega)  # (grid, dim/4)
    axis = torch.cat([axis.sin(), axis.cos()], dim=1)  # (grid, dim/2)
    rows = axis[:, None, :].expand(grid, grid, dim // 2)
    cols = axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=2).reshape(grid * grid, dim).float()


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B, ...) scalars → (B, ..., dim) [cos | sin] features at geometric frequencies (the usual
    timestep embedding, applied here to similarities)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float().unsqueeze(-1) * freqs
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


class _EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextureEncoder(nn.Module):
    """Similarity-aware texture encoder (D12): (tp^k, s^k) → texture prompt P, timestep-independent.

    Per reference k: PatchEmbed(token_patch) of tp_k (C, V, V) → (V/token_patch)² tokens, plus the
    fixed 2-D sin-cos positional embedding, plus E_sim(s_k) = MLP(sinusoid(s_k · sim_scale)) added to
    every token of that reference; optionally (sim_weighting) the reference's tokens are scaled by
    K·softmax(s/sim_temperature)_k. Then `depth` pre-norm transformer layers over all K·(V/p)² tokens
    and a final LayerNorm. No reference-index embedding: permuting the references together with
    their similarities permutes the prompt's token blocks and changes nothing else.

    `k` is the expected number of references (the prompt length is `num_tokens`); forward accepts
    any K >= 1."""

    def __init__(
        self,
        in_channels: int = 4,
        patch: int = 16,
        token_patch: int = 2,
        dim: int = 768,
        depth: int = 2,
        heads: int = 12,
        k: int = 3,
        *,
        mlp_ratio: float = 4.0,
        sim_weighting: bool = True,  # our choice (PATCHSCALER.md D12)
        sim_temperature: float = 0.1,  # our choice (PATCHSCALER.md D12)
        sim_scale: float = 1000.0,  # our choice (PATCHSCALER.md D12): s ∈ [-1, 1] to the timestep range
        sim_freq_dim: int = 256,  # our choice (PATCHSCALER.md D12): DiT's timestep-embedding width
    ):
        super().__init__()
        in_channels = _as_int(in_channels, "TextureEncoder in_channels", 1)
        patch = _as_int(patch, "TextureEncoder patch", 1)
        token_patch = _as_int(token_patch, "TextureEncoder token_patch", 1)
        dim = _as_int(dim, "TextureEncoder dim", 4)
        depth = _as_int(depth, "TextureEncoder depth", 0)
        heads = _as_int(heads, "TextureEncoder heads", 1)
        k = _as_int(k, "TextureEncoder k", 1)
        sim_freq_dim = _as_int(sim_freq_dim, "TextureEncoder sim_freq_dim", 2)
        if patch % token_patch:
            raise ConfigError(f"TextureEncoder: patch {patch} is not a multiple of token_patch {token_patch}")
        if dim % heads or dim % 4:
            raise ConfigError(f"TextureEncoder: dim {dim} must be divisible by heads ({heads}) and by 4")
        if not sim_temperature > 0:
            raise ConfigError(f"TextureEncoder: sim_temperature must be > 0, got {sim_temperature}")
        self.in_channels, self.patch, self.token_patch, self.dim = in_channels, patch, token_patch, dim
        self.depth, self.heads, self.k, self.mlp_ratio = depth, heads, k, float(mlp_ratio)
        self.sim_weighting, self.sim_temperature = bool(sim_weighting), float(sim_temperature)
        self.sim_scale, self.sim_freq_dim = float(sim_scale), sim_freq_dim
        self.grid = patch // token_patch

        self.patch_embed = nn.Conv2d(in_channels, dim, token_patch, token_patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid)[None], persistent=False)
        self.sim_embed = nn.Sequential(nn.Linear(sim_freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)  # our choice (PATCHSCALER.md D12): pre-norm stacks end with a norm
        self._init_weights()

    def _init_weights(self) -> None:
        # our choice (PATCHSCALER.md D12): DiT's initialisation (xavier linears, patch embed as a linear)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.sim_embed[0], self.sim_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)

    @property
    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "patch": self.patch,
            "token_patch": self.token_patch,
            "dim": self.dim,
            "depth": self.depth,
            "heads": self.heads,
            "k": self.k,
            "mlp_ratio": self.mlp_ratio,
            "sim_weighting": self.sim_weighting,
            "sim_temperature": self.sim_temperature,
            "sim_scale": self.sim_scale,
            "sim_freq_dim": self.sim_freq_dim,
        }

    @property
    def tokens_per_reference(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """Prompt length for `k` references: k·(patch/token_patch)²."""
        return self.k * self.tokens_per_reference

    def forward(self, refs: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
        """refs (B, K, C, V, V) texture priors tp^k, sims (B, K) their similarities s^k →
        prompt (B, K·(V/token_patch)², dim) in the model's dtype. Tokens are grouped by reference
        (reference 0's tokens first), row-major within a reference. No timestep input."""
        shape_ok = (
            refs.ndim == 5 and refs.shape[2] == self.in_channels and refs.shape[3:] == (self.patch,) * 2
        )
        if not shape_ok:
            raise ConfigError(
                f"TextureEncoder expects refs (B, K, {self.in_channels}, {self.patch}, {self.patch}), "
                f"got {tuple(refs.shape)}"
            )
        b, k = refs.shape[:2]
        if k < 1 or sims.shape != (b, k):
            raise ConfigError(
                f"TextureEncoder expects sims (B, K) = ({b}, {k}) with K >= 1, got {tuple(sims.shape)}"
            )
        p = self.patch_embed.weight
        x = self.patch_embed(refs.reshape(b * k, *refs.shape[2:]).to(p.device, p.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(b, k, self.tokens_per_reference, self.dim)
        sims = sims.to(p.device, torch.float32)
        e_sim = self.sim_embed(sinusoidal_embedding(sims * self.sim_scale, self.sim_freq_dim).to(p.dtype))
        x = x + self.pos_embed.to(p.dtype)[:, None] + e_sim[:, :, None, :]
        if self.sim_weighting:
            # our choice (PATCHSCALER.md D12): K·softmax so equal similarities leave the tokens unscaled
            w = k * torch.softmax(sims / self.sim_temperature, dim=1)
            x = x * w.to(p.dtype)[:, :, None, None]
        x = x.reshape(b, k * self.tokens_per_reference, self.dim)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
