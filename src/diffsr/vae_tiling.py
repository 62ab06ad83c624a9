"""Tiled VAE encoder/decoder whose GroupNorm statistics are those of the whole image.

Splitting a VAE pass into tiles keeps the large temporaries small, but each tile's GroupNorm would
see only its own statistics and the tiles would disagree in tone. Here every tile runs the real
diffusers forward in its own thread; the GroupNorm layers are swapped (for the duration of the call)
for one that reports the tile's per-group sums over its *core* (the part it owns, without the
overlap), waits until every tile has reported, and normalises with the pooled mean and variance.
The tiles run strictly one at a time, in order (a baton passes at each GroupNorm), so the threads
never compete for cores and the result does not depend on scheduling.

Exact: GroupNorm statistics (pooled over disjoint cores that cover the image). Approximate:
convolutions near a tile edge see `pad` pixels of context instead of the whole image, and the
VAE's mid-block self-attention attends within the padded tile. The difference to an untiled pass
shrinks as `pad` grows (tests/test_tiling.py measures it).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_local = threading.local()


@dataclass(frozen=True)
class TileBox:
    """A tile in input coordinates: `box` (padded, what the network sees) and `core` (what it owns).

    Both are (y0, y1, x0, x1), half-open."""

    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]


def split_axis(size: int, tile: int, align: int) -> list[tuple[int, int]]:
    """Split [0, size) into ceil(size/tile) near-equal parts whose inner bounds are multiples of align."""
    n = max(1, math.ceil(size / tile))
    bounds = [0] + [round(i * size / n / align) * align for i in range(1, n)] + [size]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def plan_tiles(height: int, width: int, tile: int, pad: int, align: int = 1) -> list[TileBox]:
    """Cover (height, width) with cores of at most `tile` px, each padded by `pad` (clipped)."""
    tiles = []
    for y0, y1 in split_axis(height, tile, align):
        for x0, x1 in split_axis(width, tile, align):
            box = (max(y0 - pad, 0), min(y1 + pad, height), max(x0 - pad, 0), min(x1 + pad, width))
            tiles.append(TileBox(box, (y0, y1, x0, x1)))
    return tiles


class _Aborted(Exception):
    """Raised in a tile thread when another tile failed."""


class _Lockstep:
    """Round-robin baton + all-reduce of GroupNorm sums across n tile threads."""

    def __init__(self, n: int):
        self.n = n
        self.cond = threading.Condition()
        self.turn = 0
        self.round = 0
        self.parts: list = [None] * n
        self.results: dict[int, tuple] = {}
        self.error: BaseException | None = None

    def _wait(self, pred: Callable[[], bool]) -> None:
        self.cond.wait_for(lambda: self.error is not None or pred())
        if self.error is not None:
            raise _Aborted

    def start(self, i: int) -> None:
        with self.cond:
            self._wait(lambda: self.turn == i)

    def allreduce(self, i: int, part: tuple[torch.Tensor, torch.Tensor, int]) -> tuple:
        with self.cond:
            r = self.round
            self.parts[i] = part
            if i == self.n - 1:  # last reporter pools the round, hands the baton back to tile 0
                s = sum(p[0] for p in self.parts)
                ss = sum(p[1] for p in self.parts)
                count = sum(p[2] for p in self.parts)
                mean = s / count
                var = (ss / count - mean * mean).clamp_min(0)
                self.results = {r: (mean, var)}
                self.round += 1
                self.turn = 0
            else:
                self.turn = i + 1
            self.cond.notify_all()
            self._wait(lambda: self.round > r and self.turn == i)
            return self.results[r]

    def finish(self, i: int) -> None:
        with self.cond:
            self.turn = i + 1
            self.cond.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()


@dataclass
class _TileContext:
    sync: _Lockstep
    index: int
    in_hw: tuple[int, int]  # padded tile size at the module's input
    core: tuple[int, int, int, int]  # core relative to the padded tile, input coordinates


def _shared_group_norm(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    ctx: _TileContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
    b, c = x.shape[:2]
    if x.dim() == 4:
        h, w = x.shape[-2:]
        ry, rx = h / ctx.in_hw[0], w / ctx.in_hw[1]  # this layer's resolution relative to the input
        x4 = x
    else:  # (B, C, h·w): diffusers' attention normalises flattened tokens; the scale is the same on both axes
        r = math.sqrt(x.shape[-1] / (ctx.in_hw[0] * ctx.in_hw[1]))
        ry = rx = r
        x4 = x.reshape(b, c, round(ctx.in_hw[0] * r), round(ctx.in_hw[1] * r))
    y0, y1, x0, x1 = ctx.core
    core = x4[:, :, round(y0 * ry) : round(y1 * ry), round(x0 * rx) : round(x1 * rx)]
    # per-channel sums in fp32 (cascade-summed by torch), pooled per group in fp64
    s = core.sum(dim=(-2, -1), dtype=torch.float32).double()
    ss = torch.linalg.vector_norm(core, 2, dim=(-2, -1), dtype=torch.float32).double() ** 2
    g = gn.num_groups
    part = (s.view(b, g, -1).sum(-1), ss.view(b, g, -1).sum(-1), core.shape[-2] * core.shape[-1] * (c // g))
    mean, var = ctx.sync.allreduce(ctx.index, part)
    rstd = (var + gn.eps).rsqrt()
    # fold the group statistics and the affine map into one per-channel scale and shift
    scale = rstd.repeat_interleave(c // g, dim=1)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if gn.affine:
        scale = scale * gn.weight.double()
        shift = shift * gn.weight.double() + gn.bias.double()
    tail = (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(b, c, *tail), x, scale.to(x.dtype).view(b, c, *tail))


@contextmanager
def _shared_group_norms(module: nn.Module):
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    for m in norms:
        m.forward = functools.partial(_shared_group_norm, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


@torch.no_grad()
def tiled_forward(
    module: nn.Module, x: torch.Tensor, *, tile: int, pad: int, scale: float, align: int = 1
) -> torch.Tensor:
    """Run `module` (a VAE Encoder or Decoder) on tiles of x with whole-image GroupNorm statistics.

    x: (B, C, H, W). scale: output/input spatial ratio (1/8 for the SD encoder, 8 for the decoder);
    align: tile bounds are multiples of this (the encoder's downsampling factor). Returns the tensor
    the module would return untiled (up to the edge effects described in the module docstring).
    """
    height, width = x.shape[-2:]
    tiles = plan_tiles(height, width, tile, pad, align)
    if len(tiles) == 1:
        return module(x)
    sync = _Lockstep(len(tiles))
    out: list[torch.Tensor] = []  # allocated by the first tile to finish
    grad_enabled = torch.is_grad_enabled()

    def work(i: int, t: TileBox) -> None:
        try:
            torch.set_grad_enabled(grad_enabled)
            by0, by1, bx0, bx1 = t.box
            cy0, cy1, cx0, cx1 = t.core
            _local.ctx = _TileContext(
                sync, i, (by1 - by0, bx1 - bx0), (cy0 - by0, cy1 - by0, cx0 - bx0, cx1 - bx0)
            )
            sync.start(i)
            y = module(x[:, :, by0:by1, bx0:bx1])
            if not out:
                out.append(y.new_empty((*y.shape[:2], round(height * scale), round(width * scale))))
            oy, ox = round((cy0 - by0) * scale), round((cx0 - bx0) * scale)
            hh, ww = round((cy1 - cy0) * scale), round((cx1 - cx0) * scale)
            out[0][
                :,
                :,
                round(cy0 * scale) : round(cy0 * scale) + hh,
                round(cx0 * scale) : round(cx0 * scale) + ww,
            ] = y[:, :, oy : oy + hh, ox : ox + ww]
            sync.finish(i)
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            sync.fail(e)
        finally:
            _local.ctx = None

    with _shared_group_norms(module):
        threads = [threading.Thread(target=work, args=(i, t), daemon=True) for i, t in enumerate(tiles)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if sync.error is not None:
        raise sync.error
    return out[0]
