"""High-quality training images: random crops with sidecar captions, reproducible per (seed, epoch, index).

:class:`HQImageDataset` yields HQ crops only; degradation into LQ inputs happens elsewhere (on the fly,
in the trainer). Sources are image folders (searched recursively, as :func:`diffsr.io.find_images`
does), single image files, and text files listing image paths one per line.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from diffsr.errors import ConfigError, ImageError
from diffsr.io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, find_images, read_image

__all__ = [
    "HQImageDataset",
    "PairedImageDataset",
    "fit_pair",
    "read_caption",
    "resolve_pairs",
    "resolve_sources",
]


def resolve_sources(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand image folders, image files and list files into the image paths they name, in order.

    A folder yields its image files recursively, sorted (hidden files and folders skipped). A file
    with an image extension is itself. Any other file is a UTF-8 list: one path per line, relative
    paths resolved against the list file's folder, blank lines and lines starting with ``#``
    ignored; a listed folder is expanded like a source folder. Duplicates across sources are kept
    (listing a file twice samples it twice). Missing sources or listed paths raise ConfigError.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[Path] = []
    for src in sources:
        root = Path(src).expanduser()
        shown = os.fspath(src)
        if not root.exists():
            raise ConfigError(f"training source {shown}: no such file or directory")
        if root.is_dir():
            paths.extend(p for p, _ in find_images([root]))
        elif not root.is_file():
            raise ConfigError(f"training source {shown}: neither a folder nor a file")
        elif root.suffix.lower() in IMAGE_EXTENSIONS:
            paths.append(root)
        else:
            paths.extend(_read_list(root, shown))
    return paths


def _read_list(list_file: Path, shown: str) -> list[Path]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(
            f"training source {shown}: neither an image folder, an image file nor a UTF-8 text list of images"
        ) from None
    except OSError as e:
        raise ConfigError(f"training source {shown}: cannot be read ({e.strerror or e})") from None
    base = list_file.parent
    out: list[Path] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        if not p.is_absolute():
            p = base / p
        if p.is_dir():
            out.extend(q for q, _ in find_images([p]))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{shown}:{lineno}: listed image {entry} does not exist (looked for {p})")
    return out


def read_caption(image_path: str | os.PathLike) -> str:
    """The caption in ``<stem>.txt`` next to the image (UTF-8, stripped), or "" when there is none."""
    side = Path(image_path).with_suffix(".txt")
    try:
        return side.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(
            f"{side}: caption unreadable ({e}); using an empty caption", RuntimeWarning, stacklevel=2
        )
        return ""


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an (H, W, C) array so both sides are at least `size`, centred.

    numpy's 'reflect' repeats the reflection when the pad is wider than the side (a 1-pixel side
    is repeated), so this works for any side length >= 1."""
    h, w = arr.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return arr
    return np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")


class HQImageDataset(torch.utils.data.Dataset):
    """Random ``crop_size`` crops of HQ images, with optional horizontal flip and sidecar captions.

    Items are ``{"hr": (3, crop, crop) float32 in [0, 1], "caption": str, "path": str}``.

    * The crop position and flip of item ``i`` in epoch ``e`` depend only on ``(seed, e, i)``
      (call :meth:`set_epoch` at the start of every epoch), so a resumed run sees the same samples.
      The global RNGs are never used.
    * Images smaller than the crop are reflect-padded; with ``min_size`` set, images whose shorter
      side is below it are skipped instead.
    * Grayscale images are replicated to RGB; alpha is dropped.
    * Unreadable images (and those skipped by ``min_size``) are reported once per file with a
      warning, and the item is served by the next usable index (wrapping), so training never
      stops on a bad file; only when no image at all is usable does ``__getitem__`` raise
      ConfigError.

    ``len()`` counts every listed image, usable or not (usability is known only once read).
    """

    def __init__(
        self,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        crop_size: int = 512,
        min_size: int | None = None,
        hflip: bool = True,
        seed: int = 0,
        captions: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
            raise ConfigError(f"crop_size must be a positive integer, got {crop_size!r}")
        if min_size is not None and (
            isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1
        ):
            raise ConfigError(f"min_size must be a positive integer or None, got {min_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.paths: list[Path] = resolve_sources(sources)
        if not self.paths:
            shown = (
                [os.fspath(sources)]
                if isinstance(sources, (str, os.PathLike))
                else list(map(os.fspath, sources))
            )
            raise ConfigError(
                f"no training images found in {', '.join(shown) or '(no sources)'} "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.crop_size = int(crop_size)
        self.min_size = None if min_size is None else int(min_size)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.captions = bool(captions)
        self.max_pixels = max_pixels
        self.epoch = 0
        self._skipped: set[int] = set()  # indices known unusable (warned once each)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips the following items use."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _skip(self, j: int, why: str) -> None:
        self._skipped.add(j)
        warnings.warn(f"{self.paths[j]}: {why}; skipped for training", RuntimeWarning, stacklevel=3)

    def _load(self, j: int) -> np.ndarray | None:
        """The pixels of image j (H, W, C), or None (after a one-time warning) when it is unusable."""
        if j in self._skipped:
            return None
        try:
            pixels = read_image(self.paths[j], max_pixels=self.max_pixels).pixels
        except (ImageError, OSError, ValueError) as e:
            msg = str(e)
            prefix = f"{self.paths[j]}: "
            self._skip(j, f"unreadable ({msg[len(prefix) :] if msg.startswith(prefix) else msg})")
            return None
        if self.min_size is not None and min(pixels.shape[:2]) < self.min_size:
            h, w = pixels.shape[:2]
            self._skip(j, f"{w}x{h} has a side shorter than min_size={self.min_size}")
            return None
        return pixels

    def _first_usable(self, i: int) -> tuple[int, int, object]:
        """(i normalised, the index j ≥ i (wrapping) of the first usable item, what `_load(j)` gave)."""
        n = len(self.paths)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} training items")
        for k in range(n):
            j = (i + k) % n
            loaded = self._load(j)
            if loaded is not None:
                return i, j, loaded
        raise ConfigError(f"none of the {n} training items is usable (see the warnings above)")

    def __getitem__(self, i: int) -> dict:
        i, j, pixels = self._first_usable(i)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        c = self.crop_size
        arr = _pad_to(pixels, c)
        h, w = arr.shape[:2]
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        flip = bool(rng.random() < 0.5)  # drawn even when hflip is off: crops don't depend on hflip
        arr = arr[top : top + c, left : left + c]
        if self.hflip and flip:
            arr = arr[:, ::-1]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        hr = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
        path = self.paths[j]
        return {"hr": hr, "caption": read_caption(path) if self.captions else "", "path": str(path)}


# ------------------------------------------------------------------------------------------------
# real LR/HR pairs


def resolve_pairs(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """Expand pair sources into (LR path, HR path) tuples, in order.

    A folder holding ``lr/`` and ``hr/`` sub-folders (what ``diffsr degrade`` writes) pairs the images
    with the same relative path (extension ignored, so ``lr/a.jpg`` pairs with ``hr/a.png``); an HR
    image with no LR partner (or the reverse) is an error. Any other file is a UTF-8 list with two
    whitespace-separated columns per line, ``LR HR`` (relative paths against the list's folder; blank
    lines and ``#`` comments ignored). Missing files raise ConfigError naming them.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    pairs: list[tuple[Path, Path]] = []
    for src in sources:
        root = Path(src).expanduser()
        shown = os.fspath(src)
        if root.is_dir():
            lr_dir, hr_dir = root / "lr", root / "hr"
            if not (lr_dir.is_dir() and hr_dir.is_dir()):
                raise ConfigError(f"pair source {shown}: a pair folder needs lr/ and hr/ sub-folders "
                                  "(as `diffsr degrade` writes), or pass a two-column list file")  # fmt: skip
            lrs = {rel.with_suffix("").as_posix(): p for p, rel in find_images([lr_dir])}
            hrs = {rel.with_suffix("").as_posix(): p for p, rel in find_images([hr_dir])}
            lonely = sorted(set(lrs) ^ set(hrs))
            if lonely:
                side = "hr" if lonely[0] in lrs else "lr"
                raise ConfigError(f"pair source {shown}: {lonely[0]} has no partner in {side}/ "
                                  f"({len(lonely)} unpaired image(s))")  # fmt: skip
            pairs.extend((lrs[k], hrs[k]) for k in sorted(lrs))
        elif root.is_file():
            pairs.extend(_read_pair_list(root, shown))
        else:
            raise ConfigError(f"pair source {shown}: no such file or directory")
    return pairs


def _read_pair_list(list_file: Path, shown: str) -> list[tuple[Path, Path]]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"pair list {shown}: cannot be read as UTF-8 text ({e})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        cols = entry.split()
        if len(cols) != 2:
            raise ConfigError(
                f"{shown}:{lineno}: a pair line is 'LR_PATH HR_PATH', got {len(cols)} column(s)"
            )
        paths = []
        for c in cols:
            p = Path(c).expanduser()
            p = p if p.is_absolute() else list_file.parent / p
            if not p.is_file():
                raise ConfigError(f"{shown}:{lineno}: listed image {c} does not exist (looked for {p})")
            paths.append(p)
        out.append((paths[0], paths[1]))
    return out


def fit_pair(lr: np.ndarray, hr: np.ndarray, scale: int, lr_path: Path) -> np.ndarray:
    """The HR (H, W, C) cropped to exactly `scale` × the LR's size (an HR up to scale−1 pixels larger is
    accepted); ImageError naming the LR file when it is not that size."""
    (lh, lw), (hh, hw) = lr.shape[:2], hr.shape[:2]
    if not (lh * scale <= hh < (lh + 1) * scale and lw * scale <= hw < (lw + 1) * scale):
        raise ImageError(f"HR {hw}x{hh} is not {scale}x its LR {lr_path} ({lw}x{lh})")
    return hr[: lh * scale, : lw * scale]


def _chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, 1|3) float array → (3, H, W) float32 tensor (gray replicated)."""
    a = np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def _pad_pair(lr: np.ndarray, hr: np.ndarray, size: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad an LR (h, w, C) to at least `size` per side and its HR (h·s, w·s, C) by s times as much,
    centred, mirroring with the edge pixel repeated ('symmetric'), which keeps the two aligned
    (LR pixel -k mirrors pixel k-1, covering exactly the HR rows that mirror its HR rows)."""
    h, w = lr.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return lr, hr
    pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
    return np.pad(lr, pads, mode="symmetric"), np.pad(hr, [(a * s, b * s) for a, b in pads], mode="symmetric")


class PairedImageDataset(HQImageDataset):
    """Aligned random crops of real LR/HR pairs: an HR crop of ``crop_size`` and the LR crop of
    ``crop_size // scale`` at the same place, flipped together.

    Items are ``{"hr": (3, crop, crop), "lr": (3, crop/s, crop/s)}`` float32 in [0, 1] plus
    ``caption`` (the HR's sidecar) and ``path`` (the HR). A pair whose HR is not ``scale`` times its
    LR (HR larger by less than ``scale`` pixels is cropped) is skipped with a one-time warning, as
    unreadable images are; pairs smaller than the crop are reflect-padded. Crops and flips of item i
    in epoch e depend only on (seed, e, i).
    """

    def __init__(self, sources, *, crop_size: int = 512, scale: int = 4, hflip: bool = True, seed: int = 0,
                 captions: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:  # fmt: skip
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
            raise ConfigError(f"scale must be a positive integer, got {scale!r}")
        if isinstance(crop_size, (int, np.integer)) and crop_size % scale:
            raise ConfigError(f"crop_size={crop_size} must be a multiple of the pair scale {scale}")
        self.pairs = resolve_pairs(sources)
        if not self.pairs:
            raise ConfigError(f"no LR/HR pairs found in {sources}")
        self.scale = int(scale)
        # the HQ dataset's checks and bookkeeping, over the HR paths
        tmp = [hr for _, hr in self.pairs]
        super().__init__(tmp[:1], crop_size=crop_size, hflip=hflip, seed=seed, captions=captions,
                         max_pixels=max_pixels)  # fmt: skip
        self.paths = tmp

    def _load(self, j: int):
        if j in self._skipped:
            return None
        lr_path, hr_path = self.pairs[j]
        try:
            lr = read_image(lr_path, max_pixels=self.max_pixels).pixels
            hr = read_image(hr_path, max_pixels=self.max_pixels).pixels
        except (ImageError, OSError, ValueError) as e:
            self._skip(j, f"unreadable pair ({e})")
            return None
        try:
            return lr, fit_pair(lr, hr, self.scale, lr_path)
        except ImageError as e:
            self._skip(j, str(e))
            return None

    def __getitem__(self, i: int) -> dict:
        i, j, (lr, hr) = self._first_usable(i)
        s, c = self.scale, self.crop_size
        rng = np.random.default_rng([self.seed, self.epoch, i])
        lr, hr = _pad_pair(lr, hr, c // s, s)
        h, w = lr.shape[:2]
        top = int(rng.integers(0, h - c // s + 1))
        left = int(rng.integers(0, w - c // s + 1))
        flip = bool(rng.random() < 0.5)
        lr = lr[top : top + c // s, left : left + c // s]
        hr = hr[top * s : top * s + c, left * s : left * s + c]
        if self.hflip and flip:
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        path = self.paths[j]
        return {"hr": _chw(hr), "lr": _chw(lr), "caption": read_caption(path) if self.captions else "",
                "path": str(path)}  # fmt: skip
