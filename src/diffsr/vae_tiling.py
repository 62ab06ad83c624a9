"""Exact, memory-bounded tiled VAE encoder/decoder.

The SD VAE normalises with GroupNorm, whose statistics span the whole image; convolutions need their
neighbours. Running tiles through the network independently gives seams and tone shifts; running them
in lock-step (each tile paused at every GroupNorm) keeps every tile's activations alive, so memory grows
with the image. Here the network runs *layer by layer*: each layer's whole-image activation lives in a
`_Store` off the compute device (host memory when computing on a GPU; an unlinked temporary file when
computing on the CPU, so the process's resident memory stays bounded), and the layer is applied one
tile at a time, reading the tile plus the context its convolution needs (1 pixel) from the store and
writing the tile's core to the next store. GroupNorm statistics are accumulated over the cores as each
store is written (Chan's parallel mean/variance, float64), so every GroupNorm uses the whole image's
statistics; the mid-block's self-attention attends over the whole image (keys and values of every
position are kept on the device: 2·C values per latent pixel, 1/32 of one full-resolution activation).

The result equals the untiled forward up to float rounding (convolution blocking, the order of the
statistics' sums). Peak memory is one tile's working set plus the attention's keys/values and the
output; see benchmarks/bench_vae_tiling.py. No threads: an exception or Ctrl-C unwinds normally, and the
stores' memory and files go with it. Nothing in the VAE is modified, so one VAE may serve several
threads at once.

Supported: diffusers' `Encoder` / `Decoder` of AutoencoderKL (GroupNorm; ResnetBlock2D, Downsample2D
with padding 0, nearest Upsample2D with a convolution, single- or multi-head Attention), with or without
peft LoRA layers on their convolutions and projections.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

OFFLOADS = ("auto", "none", "cpu", "disk")
Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


def split_axis(size: int, tile: int) -> list[tuple[int, int]]:
    """Split [0, size) into ceil(size/tile) near-equal parts."""
    n = max(1, math.ceil(size / max(1, tile)))
    bounds = [round(i * size / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def plan_tiles(height: int, width: int, tile: int) -> list[Box]:
    """Disjoint cores of at most `tile` pixels per side covering (height, width), row-major."""
    return [(y0, y1, x0, x1) for y0, y1 in split_axis(height, tile) for x0, x1 in split_axis(width, tile)]


def resolve_offload(offload: str, device: torch.device) -> str:
    """'auto' → 'cpu' (host memory) on an accelerator, 'disk' (temporary file) on the CPU."""
    if offload not in OFFLOADS:
        raise ConfigError(f"vae offload {offload!r} is not one of {', '.join(OFFLOADS)}")
    if offload == "auto":
        return "disk" if device.type == "cpu" else "cpu"
    return offload


# ------------------------------------------------------------------------------------------------
# Stores: one whole-image activation (B, C, H, W), read and written by window
class _Store:
    """An activation kept in a tensor (on the compute device, or in host memory)."""

    def __init__(self, shape, dtype, device: torch.device, where: torch.device, data=None):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.data = data if data is not None else torch.empty(shape, dtype=dtype, device=where)
        self.stats: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (count, mean, M2), (B, C) f64

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return self.data[:, :, y0:y1, x0:x1].to(self.device)

    def write(self, y0: int, x0: int, t: torch.Tensor) -> None:
        self.data[:, :, y0 : y0 + t.shape[-2], x0 : x0 + t.shape[-1]] = t

    def close(self) -> None:
        self.data = None


class _DiskStore(_Store):
    """An activation in an anonymous temporary file, (B, H, W, C) row-major, so that a window is one
    contiguous run of bytes per row. Pages in the OS cache are not part of the process's memory."""

    def __init__(self, shape, dtype, device: torch.device, folder: str | None):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.stats = None
        self.file = tempfile.TemporaryFile(dir=folder, buffering=0)  # unlinked: gone when closed or killed
        self.pixel = shape[1] * torch.empty((), dtype=dtype).element_size()  # bytes per pixel (all channels)

    def _rows(self, y0: int, y1: int, x0: int, x1: int):
        b, _, h, w = self.shape
        for bi in range(b):
            if x0 == 0 and x1 == w:  # whole rows: one contiguous run
                yield bi, None, (bi * h + y0) * w * self.pixel
            else:
                for r in range(y0, y1):
                    yield bi, r - y0, ((bi * h + r) * w + x0) * self.pixel

    def read(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        b, c = self.shape[:2]
        out = torch.empty((b, y1 - y0, x1 - x0, c), dtype=self.dtype)
        raw = out.view(torch.uint8).numpy().reshape(b, y1 - y0, -1)
        for bi, r, off in self._rows(y0, y1, x0, x1):
            self.file.seek(off)
            buf = raw[bi] if r is None else raw[bi, r]
            if self.file.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                raise OSError("tiled VAE: short read from its temporary file")
        return out.permute(0, 3, 1, 2).to(self.device).contiguous()

    def write(self, y0: int, x0: int, t: torch.Tensor) -> None:
        h, w = t.shape[-2:]
        rows = t.detach().permute(0, 2, 3, 1).to("cpu").contiguous()
        raw = rows.view(torch.uint8).numpy().reshape(t.shape[0], h, -1)
        for bi, r, off in self._rows(y0, y0 + h, x0, x0 + w):
            self.file.seek(off)
            self.file.write(memoryview(raw[bi] if r is None else raw[bi, r]).cast("B"))

    def close(self) -> None:
        self.file.close()


def _accumulate(store: _Store, t: torch.Tensor) -> None:
    """Fold the per-channel mean and M2 of a written core t (B, C, h, w) into store.stats (Chan et al.)."""
    var, mean = torch.var_mean(t.float(), dim=(-2, -1), correction=0)
    n_b = t.shape[-2] * t.shape[-1]
    mean, m2 = mean.double(), var.double() * n_b
    if store.stats is None:
        store.stats = (n_b, mean, m2)
        return
    n_a, mean_a, m2_a = store.stats
    n = n_a + n_b
    delta = mean - mean_a
    store.stats = (n, mean_a + delta * (n_b / n), m2_a + m2 + delta * delta * (n_a * n_b / n))


def _group_norm_affine(stats, gn: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-image GroupNorm as a per-channel map x·scale + shift; (B, C, 1, 1) float32 each."""
    n, mean, m2 = stats
    b, c = mean.shape
    g = gn.num_groups
    k = c // g
    mean_c = mean.view(b, g, k)
    mean_g = mean_c.mean(-1)  # every channel has n values
    m2_g = m2.view(b, g, k).sum(-1) + n * ((mean_c - mean_g[..., None]) ** 2).sum(-1)
    rstd = (m2_g / (n * k) + gn.eps).rsqrt()
    scale = rstd.repeat_interleave(k, dim=1)
    shift = -mean_g.repeat_interleave(k, dim=1) * scale
    if gn.affine:
        scale = scale * gn.weight.double()
        shift = shift * gn.weight.double() + gn.bias.double()
    return scale.float()[..., None, None], shift.float()[..., None, None]


def _norm(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    scale, shift = affine
    return torch.addcmul(shift, x.float(), scale).to(x.dtype)


def _base(module: nn.Module) -> nn.Module:
    """The plain layer under a peft LoRA wrapper (for its kernel size and padding)."""
    return getattr(module, "base_layer", module)


def _unsupported(what: str) -> ConfigError:
    return ConfigError(f"tiled VAE: {what} is not supported; pass a tile size larger than the image")


@dataclass
class _Tiler:
    """Runs layers tile by tile between stores. `tile` is in pixels of the module's input; a layer at
    relative resolution s uses cores of round(tile·s) pixels."""

    tile: int
    device: torch.device
    offload: str
    folder: str | None
    progress: Callable[[dict], None] | None = None
    _layers: int = 0

    def store(self, shape, dtype, *, final: bool = False) -> _Store:
        if final or self.offload == "none":
            return _Store(shape, dtype, self.device, self.device)
        if self.offload == "cpu":
            return _Store(shape, dtype, self.device, torch.device("cpu"))
        return _DiskStore(shape, dtype, self.device, self.folder)

    def run(self, shape, dtype, scale: float, compute: Callable[[Box], torch.Tensor], *,
            final: bool = False) -> _Store:  # fmt: skip
        """A new store of `shape`, filled core by core with compute(box); statistics accumulated."""
        out = self.store(shape, dtype, final=final)
        try:
            for box in plan_tiles(shape[2], shape[3], max(1, round(self.tile * scale))):
                t = compute(box)
                out.write(box[0], box[2], t)
                if not final:
                    _accumulate(out, t)
        except BaseException:
            out.close()
            raise
        self._layers += 1
        if self.progress:
            self.progress({"stage": "vae", "layers": self._layers})
        return out


def _window(src: _Store, box: Box, halo: int) -> tuple[torch.Tensor, int, int]:
    """src's window around `box` with `halo` pixels of context (clipped at the image border), and the
    offset of the box inside it."""
    y0, y1, x0, x1 = box
    h, w = src.shape[-2:]
    wy0, wx0 = max(y0 - halo, 0), max(x0 - halo, 0)
    return src.read(wy0, min(y1 + halo, h), wx0, min(x1 + halo, w)), y0 - wy0, x0 - wx0


def _same_conv(conv: nn.Module) -> int:
    """The context a stride-1 'same' convolution needs (its padding), checked."""
    b = _base(conv)
    k, s, p = b.kernel_size, b.stride, b.padding
    if s != (1, 1) or p != (k[0] // 2, k[1] // 2) or k[0] != k[1] or k[0] % 2 == 0:
        raise _unsupported(f"convolution {tuple(k)}/stride {tuple(s)}/padding {p}")
    return p[0]


def _conv(t: _Tiler, src: _Store, scale: float, conv: nn.Module, pre=None, *, final=False) -> _Store:
    """conv(pre(x)) for a stride-1 'same' convolution; pre is pointwise (GroupNorm, activation)."""
    halo = _same_conv(conv)
    b, _, h, w = src.shape

    def compute(box: Box) -> torch.Tensor:
        x, oy, ox = _window(src, box, halo)
        y = conv(pre(x) if pre is not None else x)
        return y[:, :, oy : oy + box[1] - box[0], ox : ox + box[3] - box[2]]

    return t.run((b, _base(conv).out_channels, h, w), src.dtype, scale, compute, final=final)


def _resnet(t: _Tiler, src: _Store, scale: float, res: nn.Module) -> _Store:
    """diffusers' ResnetBlock2D without a time embedding: (shortcut(x) + conv2(act(n2(conv1(act(n1 x)))))) / s."""
    if getattr(res, "upsample", None) is not None or getattr(res, "downsample", None) is not None:
        raise _unsupported("a resnet with up/downsampling")
    if getattr(res, "time_emb_proj", None) is not None or res.time_embedding_norm not in ("default", "group"):
        raise _unsupported("a resnet with a time embedding")
    act = res.nonlinearity
    n1 = _group_norm_affine(src.stats, res.norm1)
    mid = _conv(t, src, scale, res.conv1, lambda x: act(_norm(x, n1)))
    try:
        n2 = _group_norm_affine(mid.stats, res.norm2)
        halo = _same_conv(res.conv2)
        shortcut = res.conv_shortcut
        if shortcut is not None and _base(shortcut).kernel_size != (1, 1):
            raise _unsupported("a 3×3 resnet shortcut")
        b, _, h, w = src.shape

        def compute(box: Box) -> torch.Tensor:
            x, oy, ox = _window(mid, box, halo)
            y = res.conv2(res.dropout(act(_norm(x, n2))))[
                :, :, oy : oy + box[1] - box[0], ox : ox + box[3] - box[2]
            ]
            skip = src.read(*box)
            if shortcut is not None:
                skip = shortcut(skip)
            return (skip + y) / res.output_scale_factor

        return t.run((b, _base(res.conv2).out_channels, h, w), src.dtype, scale, compute)
    finally:
        mid.close()


def _attention(t: _Tiler, src: _Store, scale: float, attn: nn.Module) -> _Store:
    """diffusers' Attention (self-attention over every position) with exact global keys and values."""
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise _unsupported("attention with spatial/q/k norms")
    b, c, h, w = src.shape
    gn = _group_norm_affine(src.stats, attn.group_norm) if attn.group_norm is not None else None
    boxes = plan_tiles(h, w, max(1, round(t.tile * scale)))

    def tokens(box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        x = src.read(*box)
        n = _norm(x, gn) if gn is not None else x
        return x, n.flatten(2).transpose(1, 2)  # (B, hw, C)

    keys, values = [], []  # every position's key and value: the order of keys does not matter
    for box in boxes:
        _, tok = tokens(box)
        keys.append(attn.to_k(tok))
        values.append(attn.to_v(tok))
    heads = attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    k, v = split(torch.cat(keys, 1)), split(torch.cat(values, 1))
    del keys, values

    def compute(box: Box) -> torch.Tensor:
        x, tok = tokens(box)
        q = split(attn.to_q(tok))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, tok.shape[1], -1).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        o = o.transpose(1, 2).reshape(b, c, box[1] - box[0], box[3] - box[2])
        if attn.residual_connection:
            o = o + x
        return o / attn.rescale_output_factor

    return t.run((b, c, h, w), src.dtype, scale, compute)


def _upsample(t: _Tiler, src: _Store, scale: float, up: nn.Module) -> _Store:
    """diffusers' Upsample2D: nearest ×2, then a 3×3 convolution."""
    if (
        getattr(up, "use_conv_transpose", False)
        or not getattr(up, "interpolate", True)
        or up.norm is not None
    ):
        raise _unsupported("this upsampler")
    conv = up.conv if up.name == "conv" else up.Conv2d_0
    halo = _same_conv(conv)
    b, _, h, w = src.shape

    def compute(box: Box) -> torch.Tensor:
        y0, y1, x0, x1 = box  # output coordinates; input row r feeds output rows 2r, 2r+1
        iy0, ix0 = max(y0 // 2 - halo, 0), max(x0 // 2 - halo, 0)
        x = src.read(iy0, min(-(-y1 // 2) + halo, h), ix0, min(-(-x1 // 2) + halo, w))
        y = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return y[:, :, y0 - 2 * iy0 : y1 - 2 * iy0, x0 - 2 * ix0 : x1 - 2 * ix0]

    return t.run((b, _base(conv).out_channels, 2 * h, 2 * w), src.dtype, 2 * scale, compute)


def _downsample(t: _Tiler, src: _Store, scale: float, down: nn.Module) -> _Store:
    """diffusers' Downsample2D with padding 0: zero-pad right/bottom by 1, 3×3 convolution, stride 2."""
    conv = down.conv
    bl = _base(conv)
    if not down.use_conv or down.padding != 0 or getattr(down, "norm", None) is not None or bl.stride != (2, 2) \
            or bl.kernel_size != (3, 3) or bl.padding != (0, 0):  # fmt: skip
        raise _unsupported("this downsampler")
    b, _, h, w = src.shape
    oh, ow = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1

    def compute(box: Box) -> torch.Tensor:
        y0, y1, x0, x1 = box  # output row j reads input rows 2j .. 2j+2 (row h is the zero pad)
        x = src.read(2 * y0, min(2 * y1 + 1, h), 2 * x0, min(2 * x1 + 1, w))
        x = F.pad(x, (0, 2 * x1 + 1 - 2 * x0 - x.shape[-1], 0, 2 * y1 + 1 - 2 * y0 - x.shape[-2]))
        return conv(x)

    return t.run((b, bl.out_channels, oh, ow), src.dtype, scale / 2, compute)


def _mid_block(t: _Tiler, s: _Store, scale: float, mid: nn.Module) -> _Store:
    s2 = _resnet(t, s, scale, mid.resnets[0])
    for attn, res in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            s3 = _attention(t, s2, scale, attn)
            s2.close()
            s2 = s3
        s3 = _resnet(t, s2, scale, res)
        s2.close()
        s2 = s3
    return s2


def _out(t: _Tiler, s: _Store, scale: float, module: nn.Module) -> torch.Tensor:
    if not isinstance(module.conv_norm_out, nn.GroupNorm):
        raise _unsupported(f"{type(module.conv_norm_out).__name__} output norm")
    n = _group_norm_affine(s.stats, module.conv_norm_out)
    out = _conv(t, s, scale, module.conv_out, lambda x: module.conv_act(_norm(x, n)), final=True)
    return out.data


def _chain(t: _Tiler, s: _Store, scale: float, steps) -> tuple[_Store, float]:
    """Apply (fn, module) steps in order, closing each intermediate store."""
    try:
        for fn, module in steps:
            nxt = fn(t, s, scale, module)
            scale *= nxt.shape[-1] / s.shape[-1]
            s.close()
            s = nxt
    except BaseException:
        s.close()
        raise
    return s, scale


def _decoder_steps(dec: nn.Module):
    yield _mid_block, dec.mid_block
    for up in dec.up_blocks:
        for r in up.resnets:
            yield _resnet, r
        for u in up.upsamplers or ():
            yield _upsample, u


def _encoder_steps(enc: nn.Module):
    for down in enc.down_blocks:
        for r in down.resnets:
            yield _resnet, r
        for d in down.downsamplers or ():
            yield _downsample, d
    yield _mid_block, enc.mid_block


@torch.no_grad()
def tiled_forward(
    module: nn.Module,
    x: torch.Tensor,
    *,
    tile: int,
    offload: str = "auto",
    folder: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run a diffusers VAE `Encoder` or `Decoder` on x (B, C, H, W) layer by layer in tiles of at most
    `tile` input pixels per side (scaled with each layer's resolution), with whole-image GroupNorm
    statistics and exact convolution context. Returns what module(x) returns, up to float rounding.

    offload: where whole-image activations wait between layers: 'auto' ('cpu' on an accelerator,
    'disk' on the CPU), 'none' (the compute device), 'cpu' (host memory), 'disk' (a temporary file in
    `folder`, default the system's temporary folder). Inputs that fit in one tile run untiled."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return module(x)
    is_decoder = hasattr(module, "up_blocks")
    if not is_decoder and not hasattr(module, "down_blocks"):
        raise _unsupported(f"module {type(module).__name__}")
    t = _Tiler(tile, x.device, resolve_offload(offload, x.device), folder, progress)
    src = _Store(x.shape, x.dtype, x.device, x.device, data=x)
    s = _conv(t, src, 1.0, module.conv_in)
    scale = 1.0
    try:
        s, scale = _chain(t, s, scale, _decoder_steps(module) if is_decoder else _encoder_steps(module))
        return _out(t, s, scale, module)
    finally:
        s.close()
