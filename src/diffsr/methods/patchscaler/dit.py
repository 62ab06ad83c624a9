"""Patch-DiT: PatchScaler's patch-level x0-predicting diffusion transformer (paper §3.1, §3.3).

Built on DiT (Peebles & Xie, 2023) as PATCHSCALER.md D8 recommends, written from the DiT paper's
description: tokens from a p×p patch embedding of concat(x_t, y0) plus a fixed 2-D sin-cos positional
embedding; DiT blocks with adaLN-Zero conditioned on the timestep embedding only (no class label);
in every block, after self-attention, a gated cross-attention to the texture prompt P,

    x ← x + g(t) ⊙ CrossAttn(LN(x), P),   g(t) = Linear(SiLU(t_emb)) ∈ R^hidden, zero-initialised,

which is our reading of the paper's "dimension-wise scaling parameters based on the time embedding
in each cross-attention layer". P does not depend on t, so its per-block keys and values are computed
once per patch (`PatchDiT.prompt_cache`) and reused for every sampling step.

Also here: the DDPM training loss on the standard x-trajectory (D6) and the linear β schedule (D5).
Timesteps are 1-based (t = 1..T) as in the paper; ᾱ_t is alphas_cumprod[t − 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError


@dataclass(frozen=True)
class PatchDiTConfig:
    """Hyperparameters of a Patch-DiT. Defaults are DiT-B/2 on a 16×16 latent patch (D8).

    in_channels: channels of x_t and of the predicted x̂0 (4, the SD VAE latent).
    cond_channels: channels of the coarse patch y0, concatenated to x_t at the input.
    input_size: V, the latent patch side the positional embedding is built for (other sides that
        divide by patch_size also work; their embedding is computed on the fly).
    prompt_dim: feature size of the texture-prompt tokens.
    learn_sigma: kept for parity with DiT's config; must be False (x0-prediction only, D6).
    """

    in_channels: int = 4
    cond_channels: int = 4
    input_size: int = 16
    patch_size: int = 2
    hidden: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    prompt_dim: int = 768
    learn_sigma: bool = False

    def __post_init__(self):
        for name in ("in_channels", "input_size", "patch_size", "hidden", "depth", "heads", "prompt_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"PatchDiTConfig: {name}={getattr(self, name)} must be ≥ 1")
        if self.cond_channels < 0:
            raise ConfigError(f"PatchDiTConfig: cond_channels={self.cond_channels} must be ≥ 0")
        if self.hidden % self.heads:
            raise ConfigError(f"PatchDiTConfig: hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.hidden % 4:
            raise ConfigError(
                f"PatchDiTConfig: hidden={self.hidden} must be divisible by 4 (2-D sin-cos positional embedding)"
            )
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"PatchDiTConfig: input_size={self.input_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.mlp_ratio <= 0:
            raise ConfigError(f"PatchDiTConfig: mlp_ratio={self.mlp_ratio} must be > 0")
        if self.learn_sigma:
            raise ConfigError(
                "PatchDiTConfig: learn_sigma=True is not supported; Patch-DiT predicts x0 only "
                "(PATCHSCALER.md D6), set learn_sigma=False"
            )


PRESETS: dict[str, PatchDiTConfig] = {
    "B/2": PatchDiTConfig(),
    # prompt_dim = hidden for every preset: our choice (PATCHSCALER.md D8, D12)
    "S/2": PatchDiTConfig(hidden=384, depth=12, heads=6, prompt_dim=384),
    "L/2": PatchDiTConfig(hidden=1024, depth=24, heads=16, prompt_dim=1024),
    "XL/2": PatchDiTConfig(hidden=1152, depth=28, heads=16, prompt_dim=1152),
    "tiny": PatchDiTConfig(hidden=64, depth=2, heads=4, prompt_dim=64),  # CPU tests
}


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE/DiT form), (grid_h·grid_w, dim) float32, row-major
    tokens: the first dim/2 features encode the row, the last dim/2 the column, each as
    [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k/(dim/4)), k = 0..dim/4 − 1."""
    if dim % 4:
        raise ConfigError(f"sincos_pos_embed_2d: dim={dim} must be divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        ang = pos[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    return torch.cat([axis(rows), axis(cols)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) → (B, dim) float32:
    [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(−k/(dim/2)) (DiT/ADM form)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) → sinusoid(t, 256) → Linear → SiLU → Linear → (B, hidden)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


@dataclass
class PromptCache:
    """Per-block cross-attention keys and values of a texture prompt, computed once per patch.

    kv[i] = (K_i, V_i), each (B, heads, L, head_dim), for block i. `cache[idx]` (a LongTensor of
    batch indices, a bool mask, a slice or an int) returns the cache of those patches, so a sampler
    can pick the patches of a chunk; a cache of batch 1 broadcasts over any batch in forward."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return self.kv[0][0].shape[0] if self.kv else 0

    @property
    def batch_size(self) -> int:
        return len(self)

    def __getitem__(self, idx) -> PromptCache:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif isinstance(idx, torch.Tensor) and idx.device != self.kv[0][0].device:
            idx = idx.to(self.kv[0][0].device)
        return PromptCache(tuple((k[idx], v[idx]) for k, v in self.kv))

    def to(self, *args, **kwargs) -> PromptCache:
        return PromptCache(tuple((k.to(*args, **kwargs), v.to(*args, **kwargs)) for k, v in self.kv))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from the patch tokens, keys/values from the prompt tokens. `kv` splits off the key and
    value projections so they can be computed once per prompt (`PromptCache`)."""

    def __init__(self, hidden: int, prompt_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(hidden, hidden)
        self.to_k = nn.Linear(prompt_dim, hidden)
        self.to_v = nn.Linear(prompt_dim, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def kv(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = prompt.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, -1).transpose(1, 2)

        return split(self.to_k(prompt)), split(self.to_v(prompt))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        if k.shape[0] != b:  # a batch-1 prompt shared by every patch
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PatchDiTBlock(nn.Module):
    """adaLN-Zero self-attention, gated cross-attention to the prompt, adaLN-Zero MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, prompt_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden, heads)
        # our choice (PATCHSCALER.md D8): an affine LN before the cross-attention (adaLN modulation
        # is for the t-conditioned branches; this branch is scaled by g(t) instead).
        self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
        self.cross = CrossAttention(hidden, prompt_dim, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))  # adaLN-Zero
        self.cross_gate = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))  # g(t)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        if kv is not None:
            x = x + self.cross_gate(c)[:, None] * self.cross(self.norm_cross(x), *kv)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class PatchDiT(nn.Module):
    """x0-predicting DiT over one latent patch, conditioned on t, the coarse patch y0 and a texture
    prompt. At initialisation every block is the identity (adaLN-Zero, g(t) = 0) and the output is 0."""

    def __init__(self, config: PatchDiTConfig | None = None):
        super().__init__()
        self.config = cfg = config if config is not None else PatchDiTConfig()
        p, d = cfg.patch_size, cfg.hidden
        self.x_embed = nn.Conv2d(cfg.in_channels + cfg.cond_channels, d, kernel_size=p, stride=p)
        grid = cfg.input_size // p
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid, grid), persistent=False)
        self.t_embed = TimestepEmbedder(d)
        self.blocks = nn.ModuleList(
            PatchDiTBlock(d, cfg.heads, cfg.mlp_ratio, cfg.prompt_dim) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(d, p, cfg.in_channels)
        self.gradient_checkpointing = False  # training: recompute each block in the backward pass
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier-uniform linears, patch embedding as a linear, N(0, 0.02) for
        the timestep MLP, zeros for every adaLN modulation, every g(t) and the output layer."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for lin in (block.ada[-1], block.cross_gate[-1]):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for lin in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @torch.no_grad()
    def _pos_embed(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        grid = self.config.input_size // self.config.patch_size
        if gh == grid and gw == grid:
            return self.pos_embed.to(like.dtype)
        return sincos_pos_embed_2d(self.config.hidden, gh, gw).to(device=like.device, dtype=like.dtype)

    def prompt_cache(self, prompt: torch.Tensor) -> PromptCache:
        """prompt: (B, L, prompt_dim) → the per-block (K, V) of every cross-attention, computed once.
        Gradients flow through the cache when the prompt (or the model) requires them."""
        cfg = self.config
        if prompt.dim() != 3 or prompt.shape[-1] != cfg.prompt_dim:
            raise ConfigError(
                f"PatchDiT: prompt has shape {tuple(prompt.shape)}; expected (B, L, {cfg.prompt_dim})"
            )
        prompt = prompt.to(self.blocks[0].cross.to_k.weight.dtype)
        return PromptCache(tuple(block.cross.kv(prompt) for block in self.blocks))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        y0: torch.Tensor,
        prompt: torch.Tensor | PromptCache | None = None,
    ) -> torch.Tensor:
        """x_t: (B, in_channels, V, V) noisy latent; t: (B,) or scalar, 1-based timesteps (long or
        float); y0: (B, cond_channels, V, V) coarse patch; prompt: (B or 1, L, prompt_dim), a
        PromptCache of batch B or 1, or None (cross-attention skipped). Returns x̂0 (B, in_channels,
        V, V) in x_t's dtype. V (and a non-square V×W) must divide by patch_size."""
        cfg = self.config
        if x_t.dim() != 4 or x_t.shape[1] != cfg.in_channels:
            raise ConfigError(
                f"PatchDiT: x_t has shape {tuple(x_t.shape)}; expected (B, {cfg.in_channels}, V, V)"
            )
        b, _, h, w = x_t.shape
        if tuple(y0.shape) != (b, cfg.cond_channels, h, w):
            raise ConfigError(
                f"PatchDiT: y0 has shape {tuple(y0.shape)}; expected {(b, cfg.cond_channels, h, w)}"
            )
        p = cfg.patch_size
        if h % p or w % p:
            raise ConfigError(f"PatchDiT: patch side {h}×{w} is not divisible by patch_size={p}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(b)
        if tuple(t.shape) != (b,):
            raise ConfigError(f"PatchDiT: t has shape {tuple(t.shape)}; expected ({b},) or a scalar")

        if isinstance(prompt, torch.Tensor):
            prompt = self.prompt_cache(prompt)
        if prompt is not None:
            if not isinstance(prompt, PromptCache):
                raise ConfigError(
                    f"PatchDiT: prompt must be a tensor, a PromptCache or None, got {type(prompt)}"
                )
            if len(prompt.kv) != len(self.blocks) or len(prompt) not in (1, b):
                raise ConfigError(
                    f"PatchDiT: PromptCache has {len(prompt.kv)} blocks and batch {len(prompt)}; "
                    f"expected {len(self.blocks)} blocks and batch {b} or 1"
                )

        tokens = self.x_embed(torch.cat([x_t, y0.to(x_t.dtype)], dim=1))  # (B, D, h/p, w/p)
        gh, gw = tokens.shape[-2:]
        x = tokens.flatten(2).transpose(1, 2) + self._pos_embed(gh, gw, tokens)
        c = self.t_embed(t).to(x.dtype)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            kv = prompt.kv[i] if prompt is not None else None
            if checkpointed:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, c, kv, use_reentrant=False)
            else:
                x = block(x, c, kv)
        x = self.final(x, c)  # (B, gh·gw, p·p·C)
        out_c = cfg.in_channels
        x = x.reshape(b, gh, gw, p, p, out_c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, out_c, gh * p, gw * p)


def linear_alphas_cumprod(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t for t = 1..T of the linear β schedule (DDPM/DiT default; PATCHSCALER.md D5), as a float64
    tensor of length T: element t − 1 is Π_{s ≤ t} (1 − β_s). √ᾱ at t = 400/700/1000 ≈ 0.442/0.084/0.006."""
    if T < 1:
        raise ConfigError(f"linear_alphas_cumprod: T={T} must be ≥ 1")
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(
            f"linear_alphas_cumprod: need 0 < beta_start ≤ beta_end < 1, got {beta_start}, {beta_end}"
        )
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def scaled_linear_alphas_cumprod(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """ᾱ_t of SD's scaled-linear schedule (β linear in √β), the option D5 keeps: float64 (T,).
    √ᾱ at t = 400/700/1000 ≈ 0.653/0.288/0.068."""
    if T < 1:
        raise ConfigError(f"scaled_linear_alphas_cumprod: T={T} must be ≥ 1")
    if not 0 < beta_start <= beta_end < 1:
        raise ConfigError(
            f"scaled_linear_alphas_cumprod: need 0 < beta_start ≤ beta_end < 1, got {beta_start}, {beta_end}"
        )
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y0: torch.Tensor,
    prompt_or_cache: torch.Tensor | PromptCache | None,
    alphas_cumprod: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    t: torch.Tensor | int | None = None,
    detach_y0: bool = True,  # our choice (PATCHSCALER.md D4): condition on stopgrad(GRM(y_LR))
) -> torch.Tensor:
    """DDPM training loss of an x0-predicting denoiser on the standard x-trajectory (paper Eq. 4,
    PATCHSCALER.md D6; PGS is not involved in training):

        t ~ U{1..T},  ε ~ N(0, I),  x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε,  L = mean (model(x_t, t, y0, P) − x0)²

    x0: (B, C, V, V) HR latent patches; y0: (B, C', V, V) coarse patches; alphas_cumprod: (T,) with
    ᾱ_t at index t − 1 (e.g. `linear_alphas_cumprod()`); t: optional (B,) or scalar 1-based
    timesteps (drawn when None); generator draws t and ε (on its own device, then moved to x0's).
    Returns a scalar loss in x0's dtype.
    """
    if x0.dim() != 4:
        raise ConfigError(f"diffusion_loss: x0 has shape {tuple(x0.shape)}; expected (B, C, V, V)")
    acp = torch.as_tensor(alphas_cumprod)
    if acp.dim() != 1 or acp.numel() < 1:
        raise ConfigError(f"diffusion_loss: alphas_cumprod has shape {tuple(acp.shape)}; expected (T,)")
    T, b = acp.numel(), x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(1, T + 1, (b,), generator=generator, device=gen_device)
    t = torch.as_tensor(t, device=x0.device)
    if t.dim() == 0:
        t = t.expand(b)
    if tuple(t.shape) != (b,):
        raise ConfigError(f"diffusion_loss: t has shape {tuple(t.shape)}; expected ({b},) or a scalar")
    t = t.to(x0.device)
    if bool((t < 1).any()) or bool((t > T).any()):
        raise ConfigError(f"diffusion_loss: timesteps must lie in 1..{T}, got {t.tolist()}")
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    a = acp.to(x0.device)[t.long() - 1]
    sa = a.sqrt().to(x0.dtype)[:, None, None, None]
    s1a = (1.0 - a).sqrt().to(x0.dtype)[:, None, None, None]
    x_t = sa * x0 + s1a * noise
    if detach_y0:
        y0 = y0.detach()
    pred = model(x_t, t, y0, prompt_or_cache)
    return F.mse_loss(pred.float(), x0.float()).to(x0.dtype)
