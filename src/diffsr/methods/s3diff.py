"""S3Diff: one-step SR on SD-Turbo with a degradation-guided LoRA and fixed-prompt CFG.

Forward (authors' code): scores (blur, noise) = DE(lr); per-sample r×r matrices M for every UNet
and VAE-encoder block from a Fourier embedding of the scores; every LoRA layer computes
y = W x + s · B(Mᵀ(A x)); z = VAE(bilinear×4(lr), reflect-padded to 64); ε = ε_neg + g(ε_pos − ε_neg)
at t = 999; z0 = (z − √(1−ᾱ)ε)/√ᾱ; y = VAE⁻¹(z0), cropped; wavelet colour fix.

The LoRA layers are peft's; the modulation is a forward hook on each layer's `lora_A` that maps
its output h to Mᵀh (per pixel for convolutions, per token for linear layers), so the layer computes
exactly the authors' modified forward without replacing peft's code. The matrices of a call are
not stored on the model: `modulated(scores)` sets them in a context variable of the model (each
thread and each call has its own value), so one loaded model serves concurrent calls, and
`checkpoint` carries them into gradient checkpointing's recomputation. Positive and negative passes
run as ONE batched UNet call; the prompt embeddings are computed once, when the model is built.
"""

from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoints, lora
from ..color import color_fix as apply_color_fix
from ..devices import resolve_device, resolve_dtype
from ..errors import CheckpointError, ConfigError, WeightsNotFoundError, hint
from ..latents import tiled_predict
from ..sd import SDParts, encode_prompts, hub_file, load_sd_parts, resolve_base
from .base import LatentSR, vae_dtype_for

DEFAULT_BASE = "stabilityai/sd-turbo"
HUB_WEIGHTS = ("zhangap/S3Diff", "s3diff.pkl")
ENV_BASE = "DIFFSR_S3DIFF_BASE"
ENV_WEIGHTS = "DIFFSR_S3DIFF_WEIGHTS"
ENV_DE_NET = "DIFFSR_DE_NET"


def de_net_help() -> str:
    """Where the degradation estimator comes from (built when raised: names the argument or the flag)."""
    return (
        "S3Diff's degradation estimator (de_net.pth) is on no model hub: it ships in the S3Diff GitHub "
        "repository (github.com/ArcticHare105/S3Diff, assets/mm-realsr/de_net.pth); pass "
        f"{hint('de_net=PATH', '--de-net PATH')} or set DIFFSR_DE_NET"
    )


POS_PROMPT = (
    "A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting."
)
NEG_PROMPT = "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
UNET_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"  # the authors' adapter names (checkpoint keys)
UNET_BLOCKS, VAE_BLOCKS = 10, 6


def unet_block_id(module: str) -> int:
    """down_blocks.i → i, mid_block → 4, up_blocks.i → 5 + i, anything else (conv_out) → 9."""
    parts = module.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return 9


def vae_block_id(module: str) -> int:
    """encoder.down_blocks.i → i, encoder.mid_block → 4, anything else (conv_in, conv_out) → 5."""
    parts = module.split(".")
    if parts[1] == "down_blocks":
        return int(parts[2])
    if parts[1] == "mid_block":
        return 4
    return 5


# ------------------------------------------------------------------------------------------------
# Degradation estimator (MM-RealSR's DEResNet), parameter names as in the released de_net.pth
class _ResBlock(nn.Module):
    """Residual block without batch norm: x + conv2(relu(conv1(x)))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class DegradationEstimator(nn.Module):
    """Two independent branches (blur, noise): conv 3→64, residual stages [64, 64, 64, 128] × 2 blocks
    (a stride-2 conv 64→128 after the third stage), global average pool, 128→512→1 + sigmoid.

    forward: lr (B, 3, h, w) in [0, 1], any size → scores (B, 2) in (0, 1): (blur, noise)."""

    def __init__(
        self, feats=(64, 64, 64, 128), blocks=(2, 2, 2, 2), downscales=(1, 1, 2, 1), branches: int = 2
    ):
        super().__init__()
        self.conv_first = nn.ModuleList(nn.Conv2d(3, feats[0], 3, 1, 1) for _ in range(branches))
        self.body = nn.ModuleList(self._body(feats, blocks, downscales) for _ in range(branches))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(feats[-1], 512), nn.ReLU(), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(branches)
        )

    @staticmethod
    def _body(feats, blocks, downscales) -> nn.Sequential:
        layers: list[nn.Module] = []
        last = len(feats) - 1
        for i, (ch, n, down) in enumerate(zip(feats, blocks, downscales, strict=True)):
            layers += [_ResBlock(ch) for _ in range(n)]
            nxt = feats[min(i + 1, last)]
            if down == 2:
                layers.append(nn.Conv2d(ch, nxt, 3, 2, 1))
            elif i < last and ch != nxt:
                layers.append(nn.Conv2d(ch, nxt, 3, 1, 1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for conv, body, fc in zip(self.conv_first, self.body, self.fc_degree, strict=True):
            feat = body(conv(x)).mean(dim=(-2, -1))
            out.append(fc(feat).squeeze(-1))
        return torch.stack(out, dim=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DegradationEstimator:
        """Read the authors' de_net.pth (safely)."""
        sd = checkpoints.safe_torch_load(path)
        net = cls()
        try:
            net.load_state_dict(sd)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{path}: not a degradation-estimator state dict ({str(e).splitlines()[0]})"
            ) from None
        return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Degradation-guided modulation
def _small_init(*modules: nn.Module, scale: float = 1e-5) -> None:
    """Kaiming-normal weights × scale, zero bias (the authors' init of the MLPs)."""
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Linear):
                nn.init.kaiming_normal_(sub.weight)
                sub.weight.data.mul_(scale)
                nn.init.zeros_(sub.bias)


class DegradationModulation(nn.Module):
    """scores (B, 2) → M_unet (B, 10, r_u, r_u), M_vae (B, 6, r_v, r_v).

    Fourier embedding with fixed W ~ N(0, 1)^64: per score [sin 2πdW, cos 2πdW] (128), both → 256;
    de_mlp Linear(256, 256)+ReLU; block_mlp Linear(64, 64)+ReLU on the block-ID embeddings;
    fuse_mlp Linear(320, r²) on [de, block] for every block."""

    def __init__(
        self, rank_unet: int = 32, rank_vae: int = 16, num_embeddings: int = 64, block_dim: int = 64
    ):
        super().__init__()
        self.rank_unet, self.rank_vae = rank_unet, rank_vae
        self.register_buffer("W", torch.randn(num_embeddings))
        self.unet_de_mlp = nn.Sequential(nn.Linear(num_embeddings * 4, 256), nn.ReLU())
        self.vae_de_mlp = nn.Sequential(nn.Linear(num_embeddings * 4, 256), nn.ReLU())
        self.unet_block_mlp = nn.Sequential(nn.Linear(block_dim, 64), nn.ReLU())
        self.vae_block_mlp = nn.Sequential(nn.Linear(block_dim, 64), nn.ReLU())
        self.unet_fuse_mlp = nn.Linear(256 + 64, rank_unet**2)
        self.vae_fuse_mlp = nn.Linear(256 + 64, rank_vae**2)
        self.unet_block_embeddings = nn.Embedding(UNET_BLOCKS, block_dim)
        self.vae_block_embeddings = nn.Embedding(VAE_BLOCKS, block_dim)
        _small_init(self.unet_de_mlp, self.vae_de_mlp, self.unet_block_mlp, self.vae_block_mlp,
                    self.unet_fuse_mlp, self.vae_fuse_mlp)  # fmt: skip

    def fourier(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, 2) → (B, 256): [sin, cos] of 2π·d·W for blur, then for noise."""
        proj = scores.float()[..., None] * self.W[None, None, :] * 2 * math.pi
        emb = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        return torch.cat([emb[:, 0], emb[:, 1]], dim=-1)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.fourier(scores)
        out = []
        for de_mlp, block_mlp, fuse, table, r in (
            (
                self.unet_de_mlp,
                self.unet_block_mlp,
                self.unet_fuse_mlp,
                self.unet_block_embeddings,
                self.rank_unet,
            ),
            (
                self.vae_de_mlp,
                self.vae_block_mlp,
                self.vae_fuse_mlp,
                self.vae_block_embeddings,
                self.rank_vae,
            ),
        ):
            de = de_mlp(emb)  # (B, 256)
            blocks = block_mlp(table.weight)  # (nb, 64)
            b, nb = de.shape[0], blocks.shape[0]
            m = fuse(torch.cat([de[:, None].expand(b, nb, -1), blocks[None].expand(b, nb, -1)], dim=-1))
            out.append(m.view(b, nb, r, r))
        return out[0], out[1]


def modulate(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mᵀ applied to the rank dimension of a LoRA-A output, per sample.

    h: (N, r, H, W) (conv) or (N, L, r) / (N, r) (linear); m: (B, r, r) with N a multiple of B.
    Sample j of h uses m[j % B]: tiles and the CFG pair are stacked as [copy 0 of the B images,
    copy 1, ...] (latents.tiled_predict, S3Diff.predict_eps), so the images cycle in that order."""
    n, b = h.shape[0], m.shape[0]
    if n % b:
        raise RuntimeError(f"S3Diff modulation for {b} images cannot apply to a batch of {n}")
    m = m.expand(n, -1, -1) if b == 1 else m.repeat(n // b, 1, 1)
    if h.dim() == 4:
        return torch.einsum("nkhw,nkr->nrhw", h, m)
    return torch.einsum("n...k,nkr->n...r", h, m)


# ------------------------------------------------------------------------------------------------
# Configuration and weights
@dataclass(frozen=True)
class S3DiffConfig:
    """Hyperparameters of an S3Diff model (saved as config.json next to the weights)."""

    rank_unet: int = 32
    rank_vae: int = 16
    alpha: float = 8.0  # peft's default lora_alpha, as the authors use: scales 0.25 (UNet), 0.5 (VAE)
    unet_targets: tuple[str, ...] = UNET_TARGETS
    vae_targets: str = VAE_TARGETS
    timestep: int = 999
    guidance_scale: float = 1.07  # the authors' code (the paper says 1.1)
    pos_prompt: str = POS_PROMPT
    neg_prompt: str = NEG_PROMPT
    num_embeddings: int = 64
    block_dim: int = 64
    base: str = DEFAULT_BASE

    def to_dict(self) -> dict:
        return checkpoints.config_to_dict("s3diff", self)

    @classmethod
    def from_dict(cls, d: dict) -> S3DiffConfig:
        return checkpoints.config_from_dict(cls, d, "S3Diff")


_PKL_MODULES = (
    "vae_de_mlp",
    "unet_de_mlp",
    "vae_block_mlp",
    "unet_block_mlp",
    "vae_fuse_mlp",
    "unet_fuse_mlp",
)


@dataclass
class S3DiffWeights:
    """Everything S3Diff trains. unet: LoRA (adapter 'default') + conv_in.{weight,bias}; vae: LoRA
    (adapter 'vae_skip'); modulation: DegradationModulation state; de_net: estimator state or None."""

    config: S3DiffConfig
    unet: dict[str, torch.Tensor] = field(repr=False)
    vae: dict[str, torch.Tensor] = field(repr=False)
    modulation: dict[str, torch.Tensor] = field(repr=False)
    de_net: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def save(self, folder: str | os.PathLike) -> Path:
        """diffsr's format: config.json + model.safetensors (prefixes unet., vae., modulation., de_net.)."""
        tensors = {
            f"{group}.{k}": v
            for group in ("unet", "vae", "modulation")
            for k, v in getattr(self, group).items()
        }
        if self.de_net is not None:
            tensors.update({f"de_net.{k}": v for k, v in self.de_net.items()})
        return checkpoints.save_folder(folder, self.config.to_dict(), tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> S3DiffWeights:
        """A diffsr folder, or the authors' s3diff.pkl (read safely)."""
        path = Path(path).expanduser()
        if path.is_dir():
            cfg, tensors = checkpoints.load_folder(path, method="s3diff")
            groups: dict[str, dict] = {"unet": {}, "vae": {}, "modulation": {}, "de_net": {}}
            for k, v in tensors.items():
                group, _, rest = k.partition(".")
                if group not in groups:
                    raise CheckpointError(f"{path}: unexpected tensor {k!r}")
                groups[group][rest] = v
            return cls(S3DiffConfig.from_dict(cfg), groups["unet"], groups["vae"], groups["modulation"],
                       groups["de_net"] or None)  # fmt: skip
        return cls.from_official(path)

    @classmethod
    def from_official(cls, path: str | os.PathLike) -> S3DiffWeights:
        sd = checkpoints.safe_torch_load(path)
        need = ["unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
                "state_dict_vae", "w", "state_embeddings", *(f"state_dict_{m}" for m in _PKL_MODULES)]  # fmt: skip
        missing = [k for k in need if not isinstance(sd, dict) or k not in sd]
        if missing:
            raise CheckpointError(f"{path}: not an S3Diff checkpoint (missing {', '.join(missing[:3])})")
        config = S3DiffConfig(
            rank_unet=int(sd["rank_unet"]),
            rank_vae=int(sd["rank_vae"]),
            unet_targets=tuple(sd["unet_lora_target_modules"]),
            vae_targets=str(sd["vae_lora_target_modules"]),
        )
        mod = {f"{m}.{k}": v for m in _PKL_MODULES for k, v in sd[f"state_dict_{m}"].items()}
        mod["W"] = sd["w"]
        emb = sd["state_embeddings"]
        mod["vae_block_embeddings.weight"] = emb["state_dict_vae_block"]["weight"]
        mod["unet_block_embeddings.weight"] = emb["state_dict_unet_block"]["weight"]
        return cls(config, dict(sd["state_dict_unet"]), dict(sd["state_dict_vae"]), mod)

    def to_official(self, path: str | os.PathLike) -> Path:
        """Write the authors' s3diff.pkl layout (for their scripts)."""
        c = self.config
        sd: dict = {
            "unet_lora_target_modules": list(c.unet_targets),
            "vae_lora_target_modules": c.vae_targets,
            "rank_unet": c.rank_unet,
            "rank_vae": c.rank_vae,
            "state_dict_unet": dict(self.unet),
            "state_dict_vae": dict(self.vae),
            "w": self.modulation["W"],
            "state_embeddings": {
                "state_dict_vae_block": {"weight": self.modulation["vae_block_embeddings.weight"]},
                "state_dict_unet_block": {"weight": self.modulation["unet_block_embeddings.weight"]},
            },
        }
        for m in _PKL_MODULES:
            sd[f"state_dict_{m}"] = {
                k[len(m) + 1 :]: v for k, v in self.modulation.items() if k.startswith(m + ".")
            }
        path = Path(path)
        checkpoints.atomic_write(path, lambda p: torch.save(sd, p))
        return path


def random_weights(
    unet: nn.Module,
    vae: nn.Module,
    *,
    seed: int = 0,
    std: float = 0.02,
    authors_init: bool = False,
    config: S3DiffConfig | None = None,
) -> S3DiffWeights:
    """S3Diff weights of random values on the authors' module selection (for tests and benchmarks).

    With authors_init the modulation MLPs keep the authors' init (kaiming × 1e-5: M ≈ 0, where
    training starts); otherwise they get O(1) random weights so that every part changes the output."""
    config = config or S3DiffConfig()
    g = torch.Generator().manual_seed(seed)
    unet_t = lora.matching_modules(unet, list(config.unet_targets))
    vae_t = lora.matching_modules(vae, config.vae_targets)
    unet_sd = lora.random_lora(unet, unet_t, UNET_ADAPTER, config.rank_unet, generator=g, std=std)
    w_in = unet.conv_in.weight.detach()
    unet_sd["conv_in.weight"] = w_in + torch.randn(w_in.shape, generator=g) * std
    unet_sd["conv_in.bias"] = unet.conv_in.bias.detach().clone()
    vae_sd = lora.random_lora(vae, vae_t, VAE_ADAPTER, config.rank_vae, generator=g, std=std)
    torch.manual_seed(seed)
    mod = DegradationModulation(config.rank_unet, config.rank_vae, config.num_embeddings, config.block_dim)
    if not authors_init:
        with torch.no_grad():
            for sub in mod.modules():
                if isinstance(sub, nn.Linear):
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=g) / math.sqrt(sub.in_features))
                    sub.bias.copy_(torch.randn(sub.bias.shape, generator=g) * 0.1)
    de = DegradationEstimator()
    return S3DiffWeights(config, unet_sd, vae_sd, dict(mod.state_dict()), dict(de.state_dict()))


def initial_weights(
    unet: nn.Module, vae: nn.Module, *, seed: int = 0, config: S3DiffConfig | None = None
) -> S3DiffWeights:
    """Where S3Diff training starts: peft's Gaussian LoRA init (A ~ N(0, 1/r), B = 0), conv_in from
    the base UNet, the modulation MLPs with the authors' init (kaiming × 1e-5, zero bias), W ~ N(0, 1)."""
    config = config or S3DiffConfig()
    g = torch.Generator().manual_seed(seed)

    def fresh(model, targets, adapter, rank):
        out = {}
        modules = dict(model.named_modules())
        for name in lora.matching_modules(model, targets):
            a_shape, b_shape = lora.lora_shapes(modules[name], rank)
            out[f"{name}.lora_A.{adapter}.weight"] = torch.randn(a_shape, generator=g) / rank
            out[f"{name}.lora_B.{adapter}.weight"] = torch.zeros(b_shape)
        return out

    unet_sd = fresh(unet, list(config.unet_targets), UNET_ADAPTER, config.rank_unet)
    unet_sd["conv_in.weight"] = unet.conv_in.weight.detach().clone()
    unet_sd["conv_in.bias"] = unet.conv_in.bias.detach().clone()
    vae_sd = fresh(vae, config.vae_targets, VAE_ADAPTER, config.rank_vae)
    torch.manual_seed(seed)
    mod = DegradationModulation(config.rank_unet, config.rank_vae, config.num_embeddings, config.block_dim)
    return S3DiffWeights(config, unet_sd, vae_sd, {k: v.clone() for k, v in mod.state_dict().items()})


# ------------------------------------------------------------------------------------------------
# The model
class S3Diff(LatentSR):
    """A loaded S3Diff model. Build with `from_pretrained` (real weights) or `from_parts`."""

    name = "s3diff"
    default_color_fix = "wavelet"

    def __init__(self, parts: SDParts, weights: S3DiffWeights, prompt_embeds: torch.Tensor,
                 de_net: DegradationEstimator, *, dtype: torch.dtype):  # fmt: skip
        """prompt_embeds: (2, 77, D) embeddings of the positive and negative prompts."""
        cfg = self.config = weights.config
        self.weights = weights
        self.unet, self.vae = parts.unet, parts.vae
        self.device = next(self.unet.parameters()).device
        self.dtype = dtype
        self.pos_embeds = prompt_embeds[:1].to(self.device, dtype)
        self.neg_embeds = prompt_embeds[1:2].to(self.device, dtype)
        self.de_net = de_net.to(self.device).eval().requires_grad_(False)
        self.modulation = DegradationModulation(
            cfg.rank_unet, cfg.rank_vae, cfg.num_embeddings, cfg.block_dim
        )
        _load_strict(self.modulation, weights.modulation, "modulation")
        self.modulation.to(self.device).eval().requires_grad_(False)

        lora.add_lora(self.unet, UNET_ADAPTER, list(cfg.unet_targets), cfg.rank_unet, cfg.alpha)
        conv_in = {k: weights.unet[k] for k in ("conv_in.weight", "conv_in.bias") if k in weights.unet}
        if len(conv_in) != 2:
            raise CheckpointError("S3Diff weights lack the trained conv_in.weight / conv_in.bias")
        lora.load_lora_tensors(
            self.unet, UNET_ADAPTER, {k: v for k, v in weights.unet.items() if k not in conv_in}
        )
        with torch.no_grad():
            self.unet.conv_in.weight.copy_(conv_in["conv_in.weight"])
            self.unet.conv_in.bias.copy_(conv_in["conv_in.bias"])
        vae_dtype = next(self.vae.parameters()).dtype
        lora.add_lora(self.vae, VAE_ADAPTER, cfg.vae_targets, cfg.rank_vae, cfg.alpha)
        lora.load_lora_tensors(self.vae, VAE_ADAPTER, weights.vae)
        torch.nn.Module.to(self.unet, dtype).eval().requires_grad_(False)
        torch.nn.Module.to(self.vae, vae_dtype).eval().requires_grad_(False)

        # M of the current call, per network: {"unet"|"vae": (N or 1, blocks, r, r)}; read by the lora_A
        # hooks. A context variable, not an attribute: concurrent calls each see their own.
        self._matrices: ContextVar[dict[str, torch.Tensor] | None] = ContextVar(
            f"s3diff_matrices_{id(self)}", default=None
        )
        self._hooks = [
            *self._install(self.unet, "unet", UNET_ADAPTER, unet_block_id),
            *self._install(self.vae, "vae", VAE_ADAPTER, vae_block_id),
        ]
        self.alpha_bar = float(parts.alphas_cumprod[cfg.timestep])
        self.timestep = torch.tensor([cfg.timestep], device=self.device, dtype=torch.long)

    def _install(self, model: nn.Module, kind: str, adapter: str, block_id) -> list:
        handles = []
        for name, layer in lora.lora_layers(model):
            bid = block_id(name)

            def hook(_mod, _inp, out, bid=bid):
                m = self._matrices.get()
                if m is None:
                    raise RuntimeError(f"S3Diff {kind} LoRA ran without degradation modulation")
                return modulate(out, m[kind][:, bid].to(out.dtype))

            handles.append(layer.lora_A[adapter].register_forward_hook(hook))
        return handles

    @contextmanager
    def modulated(self, scores: torch.Tensor):
        """Within the block, the LoRA layers use the matrices for `scores` (B, 2); the networks'
        batches must have B elements, or B must be 1 (then every batch element uses them)."""
        m_unet, m_vae = self.modulation(scores.to(self.device).float())
        token = self._matrices.set({"unet": m_unet, "vae": m_vae})
        try:
            yield m_unet, m_vae
        finally:
            self._matrices.reset(token)

    def checkpoint(self, fn, *args, **kwargs):
        """Gradient checkpointing that recomputes `fn` with the matrices of the call that ran it
        (pass to diffusers' `enable_gradient_checkpointing(gradient_checkpointing_func=...)`)."""
        from torch.utils.checkpoint import checkpoint

        matrices = self._matrices.get()

        def run(*a, **kw):
            token = self._matrices.set(matrices)
            try:
                return fn(*a, **kw)
            finally:
                self._matrices.reset(token)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | S3DiffWeights | None = None,
        *,
        base: str | os.PathLike | None = None,
        de_net: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        vae_dtype: str | torch.dtype | None = None,
    ) -> S3Diff:
        """weights: s3diff.pkl or a diffsr folder (default $DIFFSR_S3DIFF_WEIGHTS, else the Hub's
        zhangap/S3Diff); base: SD-Turbo (Hub id or folder; $DIFFSR_S3DIFF_BASE); de_net: the
        estimator's de_net.pth ($DIFFSR_DE_NET) unless the diffsr folder carries it."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if not isinstance(weights, S3DiffWeights):
            src = weights or os.environ.get(ENV_WEIGHTS)
            if src and not Path(src).expanduser().exists():
                raise WeightsNotFoundError(
                    f"{src}: no such file or folder ({hint('weights=', '--weights')} / ${ENV_WEIGHTS})"
                )
            if not src:
                src = hub_file(*HUB_WEIGHTS, env=ENV_WEIGHTS, arg="weights")
            weights = S3DiffWeights.load(src)
        if weights.de_net is not None and de_net is None:
            net = DegradationEstimator()
            _load_strict(net, weights.de_net, "de_net")
        else:
            de_src = de_net or os.environ.get(ENV_DE_NET)
            if not de_src:
                raise WeightsNotFoundError(de_net_help())
            if not Path(de_src).expanduser().is_file():
                raise WeightsNotFoundError(f"{de_src}: no such file. {de_net_help()}")
            net = DegradationEstimator.load(Path(de_src).expanduser())
        folder = resolve_base(base, default=weights.config.base, env=ENV_BASE)
        parts = load_sd_parts(
            folder, device=dev, dtype=torch.float32, vae_dtype=vae_dtype_for(vae_dtype, dt, dev)
        )
        return cls.from_parts(parts, weights, de_net=net, dtype=dt)

    @classmethod
    def from_parts(cls, parts: SDParts, weights: S3DiffWeights, *, de_net: DegradationEstimator | None = None,
                   dtype: torch.dtype = torch.float32) -> S3Diff:  # fmt: skip
        """Build from SD parts in memory; the text encoder embeds the two prompts once, then is released."""
        if parts.text_encoder is None:
            raise ConfigError("S3Diff needs the text encoder once, to embed its two prompts")
        if de_net is None:
            if weights.de_net is None:
                raise WeightsNotFoundError(de_net_help())
            de_net = DegradationEstimator()
            _load_strict(de_net, weights.de_net, "de_net")
        emb = encode_prompts(
            parts.text_encoder, parts.tokenizer, [weights.config.pos_prompt, weights.config.neg_prompt]
        )
        parts.text_encoder = parts.tokenizer = None
        gc.collect()
        return cls(parts, weights, emb, de_net, dtype=dtype)

    def current_weights(self) -> S3DiffWeights:
        """The weights as they are now in the modules (after training), estimator included."""
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        unet = lora.lora_state_dict(self.unet, UNET_ADAPTER)
        unet["conv_in.weight"], unet["conv_in.bias"] = self.unet.conv_in.weight, self.unet.conv_in.bias
        return S3DiffWeights(self.config, cpu(unet), cpu(lora.lora_state_dict(self.vae, VAE_ADAPTER)),
                             cpu(self.modulation.state_dict()), cpu(self.de_net.state_dict()))  # fmt: skip

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        return self.current_weights().save(folder)

    # ---------------------------------------------------------------- passes
    @torch.no_grad()
    def estimate(self, lr: torch.Tensor) -> torch.Tensor:
        """(blur, noise) scores of lr (B, 3, h, w) in [0, 1] → (B, 2) in (0, 1)."""
        return self.de_net(lr.to(self.device).float())

    def predict_eps(self, z: torch.Tensor, guidance_scale: float, batched: bool = True) -> torch.Tensor:
        """CFG noise prediction ε_neg + g(ε_pos − ε_neg) at t = 999 for z (n, 4, h, w); inside `modulated`.

        batched: positive and negative in ONE UNet call (2n); else two calls (the authors' way)."""
        n = z.shape[0]
        z = z.to(self.dtype)
        pos, neg = self.pos_embeds.expand(n, -1, -1), self.neg_embeds.expand(n, -1, -1)
        if batched:
            eps = self.unet(
                torch.cat([z, z]), self.timestep, encoder_hidden_states=torch.cat([pos, neg])
            ).sample
            e_pos, e_neg = eps[:n], eps[n:]
        else:
            e_pos = self.unet(z, self.timestep, encoder_hidden_states=pos).sample
            e_neg = self.unet(z, self.timestep, encoder_hidden_states=neg).sample
        return (e_neg + guidance_scale * (e_pos - e_neg)).float()

    def x0(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DDPM x0 at t = 999: (z − √(1−ᾱ)·ε)/√ᾱ."""
        return (z - math.sqrt(1 - self.alpha_bar) * eps) / math.sqrt(self.alpha_bar)

    @torch.no_grad()
    def restore(
        self,
        lr: torch.Tensor,
        *,
        blur: float | None = None,
        noise: float | None = None,
        guidance_scale: float | None = None,
        cfg_batched: bool = True,
        **options,
    ) -> tuple[torch.Tensor, dict]:
        """lr (B, 3, h, w) in [0, 1] → (SR (B, 3, 4h, 4w) in [0, 1] fp32 on CPU, info).

        blur / noise in [0, 1] replace the estimated scores (paper §4.4); info reports both the
        estimated and the used scores (for B > 1, a list with one dict per image)."""
        opts = self.options(options)
        g = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(g):
            raise ConfigError(f"guidance_scale={guidance_scale!r} must be a finite number")
        for k, v in (("blur", blur), ("noise", noise)):
            if v is not None and not 0 <= v <= 1:
                raise ConfigError(f"{k}={v} must be in [0, 1]")
        lr = lr.float().to(self.device)
        est = self.estimate(lr)
        used = est.clone()
        if blur is not None:
            used[:, 0] = blur
        if noise is not None:
            used[:, 1] = noise
        h, w = lr.shape[-2:]
        x_up = F.interpolate(lr, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        x = (x_up * 2 - 1).clamp(-1, 1)
        ph, pw = (-x.shape[-2]) % 64, (-x.shape[-1]) % 64
        if ph or pw:
            x = _reflect_pad(x, ph, pw)
        with self.modulated(used):
            z = self.encode(x, opts)
            eps = tiled_predict(lambda t: self.predict_eps(t, g, cfg_batched), z, **opts.tiling())
            y = self.decode(self.x0(z, eps), opts)[..., : 4 * h, : 4 * w]
        y = apply_color_fix(y, x_up.float(), opts.color_fix).cpu()
        est_l = [{"blur": float(e[0]), "noise": float(e[1])} for e in est]
        used_l = [
            {
                "blur": float(blur) if blur is not None else e["blur"],
                "noise": float(noise) if noise is not None else e["noise"],
            }
            for e in est_l
        ]  # an override is reported as given, not as its float32 copy
        # one image: plain dicts; a batch: one dict per image (the API splits them per image)
        info = {
            "estimated": est_l[0] if len(est_l) == 1 else est_l,
            "used": used_l[0] if len(used_l) == 1 else used_l,
            "guidance_scale": g,
        }
        return y, info


def _reflect_pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Reflect-pad right/bottom; repeated when the pad exceeds the image (reflect needs pad < size)."""
    while ph or pw:
        sh, sw = min(ph, x.shape[-2] - 1), min(pw, x.shape[-1] - 1)
        x = F.pad(x, (0, sw, 0, sh), mode="reflect")
        ph, pw = ph - sh, pw - sw
    return x


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"S3Diff {what} weights do not fit: {str(e).splitlines()[0][:200]}") from None
