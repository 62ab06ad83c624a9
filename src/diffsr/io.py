"""Image input/output: decoding, encoding, array conversion and folder walking.

Everything in diffsr works on :class:`ImageData`: float32 pixels in ``[0, 1]`` with shape
``(H, W, C)`` (``C == 1`` for grayscale, ``3`` for RGB), an optional float32 alpha plane and
the bit depth of the source (8 or 16), so a 16-bit input can be written back as 16-bit.

Decoding goes through Pillow, except for 16-bit-per-channel colour PNG/TIFF files, which
Pillow silently truncates to 8 bits; those are decoded with OpenCV. Encoding goes through
Pillow, except for 16-bit colour (and 16-bit gray + alpha) PNG/TIFF and BMP with alpha, which
go through OpenCV. Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import secrets
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffsr.errors import ImageError, hint

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "find_images",
    "from_array",
    "from_pil",
    "output_path",
    "read_image",
    "to_array",
    "to_pil",
    "write_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
"""Lower-case suffixes diffsr reads and writes."""

DEFAULT_MAX_PIXELS: int = 1 << 24
"""Largest input (width * height) read_image accepts by default: 16.8 MP."""

# Pillow format names by extension, for writing.
_FORMAT_BY_EXT = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
# Pillow plugins read_image lets Image.open try (a JPEG with MPO data still opens, as "MPO").
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF", "BMP"})

# EXIF orientation (tag 0x0112) -> the transpose that undoes it, as PIL.ImageOps.exif_transpose.
_ORIENTATION_TAG = 0x0112
_PIL_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# --------------------------------------------------------------------------------------------
# ImageData


@dataclass
class ImageData:
    """A decoded image.

    ``pixels``: float32 ``(H, W, C)`` with ``C`` 1 (gray) or 3 (RGB), values in ``[0, 1]``.
    ``alpha``: float32 ``(H, W)`` in ``[0, 1]``, or ``None``.
    ``bit_depth``: 8 or 16, the precision of the source (decided by its mode/dtype, never by
    its pixel values); write_image writes 16-bit PNG/TIFF when it is 16.
    ``format``: the source file format as Pillow names it (``"PNG"``, ``"JPEG"``, ...), or None.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    format: str | None = None

    def __post_init__(self) -> None:
        pixels = np.asarray(self.pixels, dtype=np.float32)
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
            raise ImageError(f"ImageData.pixels must have shape (H, W, 1) or (H, W, 3), got {pixels.shape}")
        self.pixels = pixels
        if self.alpha is not None:
            alpha = np.asarray(self.alpha, dtype=np.float32)
            if alpha.shape != pixels.shape[:2]:
                raise ImageError(
                    f"ImageData.alpha must have shape {pixels.shape[:2]} to match the pixels, got {alpha.shape}"
                )
            self.alpha = alpha
        if self.bit_depth not in (8, 16):
            raise ImageError(f"ImageData.bit_depth must be 8 or 16, got {self.bit_depth!r}")

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        """Colour channels, alpha not counted (1 or 3)."""
        return int(self.pixels.shape[2])

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[2] == 1

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None


# --------------------------------------------------------------------------------------------
# small helpers


def _prefix(name: str | os.PathLike | None) -> str:
    return f"{os.fspath(name)}: " if name else ""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fmt_pixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixels"


def _unit_float(a: np.ndarray, scale: float) -> np.ndarray:
    """Integer array -> float32 in [0, 1] (divide by ``scale``)."""
    out = np.asarray(a).astype(np.float32)  # always a fresh array
    out /= np.float32(scale)
    return out


def _quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Float in [0, 1] -> uint8 (bits=8) or uint16 (bits=16), clipped and rounded."""
    peak = 255.0 if bits == 8 else 65535.0
    y = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
    y = y * np.float32(peak)
    np.rint(y, out=y)
    return y.astype(np.uint8 if bits == 8 else np.uint16)


def _orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """Undo EXIF ``orientation`` on an (H, W[, C]) array, with exif_transpose's semantics."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = np.rot90(a, -1)
    elif orientation == 7:
        a = a[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        a = np.rot90(a, 1)
    return np.ascontiguousarray(a)


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of ``im`` (1..8), 1 when absent or unreadable (bad EXIF is not fatal)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception:  # malformed EXIF must not make a valid image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _tile_rawmode(im: Image.Image) -> str:
    """The raw (on-disk) mode of the first tile of a not yet loaded image, '' when unknown."""
    tile = getattr(im, "tile", None)
    if not tile:
        return ""
    args = tile[0].args if hasattr(tile[0], "args") else tile[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


# Pillow's own decompression-bomb guard runs inside Image.open (and TIFF loading) and would
# pre-empt our check with its own message and limit. It can only be switched off through the
# module global Image.MAX_IMAGE_PIXELS, so read_image sets it to None while it opens and
# decodes, reference-counted so that concurrent read_image calls do not restore it early.
_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved: int | None = None


@contextlib.contextmanager
def _pillow_bomb_check_off() -> Iterator[None]:
    global _bomb_depth, _bomb_saved
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


# --------------------------------------------------------------------------------------------
# PIL <-> ImageData


def from_pil(im: Image.Image) -> ImageData:
    """Convert a PIL image to :class:`ImageData` (pixels only: EXIF orientation is NOT applied;
    read_image does that).

    Mode rules: "1"/"L" -> gray 8-bit; "LA"/"La" -> gray + alpha; "P" -> RGB, or RGB + alpha
    when it has transparency; "PA"/"RGBA"/"RGBa" -> RGB + alpha; "RGB" -> RGB (a tRNS colour key
    on "L"/"RGB" becomes alpha); "CMYK"/"YCbCr"/"LAB"/"HSV"/"RGBX" -> RGB;
    "I;16*" -> gray 16-bit (/65535); "I" -> gray 16-bit clipped to [0, 65535]; "F" -> ImageError.
    """
    name = getattr(im, "filename", None) or None
    fmt = getattr(im, "format", None)
    mode = im.mode

    if mode.startswith("I;16"):
        arr = np.asarray(im)
        return ImageData(_unit_float(arr, 65535.0)[..., None], None, 16, fmt)
    if mode == "I":
        arr = np.clip(np.asarray(im), 0, 65535)
        return ImageData(_unit_float(arr, 65535.0)[..., None], None, 16, fmt)
    if mode == "F":
        raise ImageError(f"{_prefix(name)}unsupported float image (mode F); convert it to 8- or 16-bit first")

    has_trns = "transparency" in im.info
    if mode == "1":
        im = im.convert("L")
    elif mode == "L" and has_trns:
        im = im.convert("LA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode in ("P", "RGB"):
        if mode == "P":
            im = im.convert("RGBA" if im.has_transparency_data else "RGB")
        elif has_trns:
            im = im.convert("RGBA")
    elif mode in ("PA", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("L", "LA", "RGBA"):
        pass
    else:
        try:
            im = im.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"{_prefix(name)}unsupported image mode {mode!r} ({_one_line(e)})") from e

    arr = np.asarray(im)
    if arr.dtype != np.uint8:  # every mode left here is 8 bits per channel
        raise ImageError(f"{_prefix(name)}unsupported image mode {mode!r} (dtype {arr.dtype})")
    if arr.ndim == 2:
        arr = arr[..., None]
    alpha = None
    if im.mode in ("LA", "RGBA"):
        alpha = _unit_float(arr[..., -1], 255.0)
        arr = arr[..., :-1]
    return ImageData(_unit_float(arr, 255.0), alpha, 8, fmt)


def to_pil(image: ImageData) -> Image.Image:
    """Convert to a PIL image: "L", "LA", "RGB" or "RGBA" (8-bit), or "I;16" for 16-bit gray.

    PIL has no 16-bit colour or 16-bit gray + alpha modes, so those come back as 8-bit
    "RGB"/"RGBA"/"LA" (use write_image to keep 16 bits on disk).
    """
    if image.bit_depth == 16 and image.is_gray and not image.has_alpha:
        return Image.fromarray(_quantize(image.pixels[..., 0], 16))
    return Image.fromarray(_to_uint8_layout(image))


def _to_uint8_layout(image: ImageData) -> np.ndarray:
    """8-bit array: (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB, (H, W, 4) RGBA."""
    pix = _quantize(image.pixels, 8)
    if image.alpha is not None:
        pix = np.concatenate([pix, _quantize(image.alpha, 8)[..., None]], axis=-1)
    elif image.is_gray:
        pix = pix[..., 0]
    return np.ascontiguousarray(pix)


# --------------------------------------------------------------------------------------------
# numpy <-> ImageData


def from_array(a: np.ndarray) -> ImageData:
    """Wrap an array as :class:`ImageData`.

    dtypes: uint8 -> bit_depth 8 (/255); uint16 -> 16 (/65535); float16/32/64 -> values taken as
    [0, 1] (clipped), bit_depth 16. Shapes: (H, W) and (H, W, 1) gray, (H, W, 2) gray + alpha,
    (H, W, 3) RGB, (H, W, 4) RGBA. Anything else raises ImageError.
    """
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ImageError(
            f"array of shape {a.shape} is not an image: expected (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4)"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"array of shape {a.shape} is an empty image")

    if a.dtype == np.uint8:
        data, bits = _unit_float(a, 255.0), 8
    elif a.dtype == np.uint16:
        data, bits = _unit_float(a, 65535.0), 16
    elif a.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(a).all():
            raise ImageError(f"array of shape {a.shape} contains non-finite values (NaN or inf)")
        data = np.clip(a, 0.0, 1.0).astype(np.float32)
        bits = 16
    else:
        raise ImageError(
            f"array dtype {a.dtype} is not supported: use uint8, uint16, float16, float32 or float64"
        )

    alpha = None
    if data.shape[2] in (2, 4):
        alpha = np.ascontiguousarray(data[..., -1])
        data = data[..., :-1]
    return ImageData(np.ascontiguousarray(data), alpha, bits, None)


def to_array(image: ImageData, like: np.ndarray) -> np.ndarray:
    """Convert back to an array with ``like``'s dtype and layout convention.

    uint8/uint16 are rounded, floats are in [0, 1] (in ``like``'s float dtype). The result is
    2-D when ``like`` was 2-D and the image is gray without alpha; otherwise it is
    (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) following ``image.is_gray`` / ``image.has_alpha``
    (an image that gained colour or alpha cannot be squeezed into 2-D without losing data).
    """
    like = np.asarray(like)
    dtype = like.dtype
    pix = image.pixels
    if image.alpha is not None:
        pix = np.concatenate([pix, image.alpha[..., None]], axis=-1)
    if dtype == np.uint8:
        out = _quantize(pix, 8)
    elif dtype == np.uint16:
        out = _quantize(pix, 16)
    elif dtype in (np.float16, np.float32, np.float64):
        out = np.clip(pix, 0.0, 1.0).astype(dtype)
    else:
        raise ImageError(
            f"array dtype {dtype} is not supported: use uint8, uint16, float16, float32 or float64"
        )
    if like.ndim == 2 and out.shape[2] == 1:
        out = out[..., 0]
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------
# reading


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageData:
    """Decode a PNG, JPEG, WebP, TIFF or BMP file.

    The size is checked from the header before any pixel is decoded; images above
    ``max_pixels`` (None: no limit) raise ImageError. EXIF orientation is applied. 16-bit
    gray and 16-bit colour files come back with ``bit_depth == 16`` and their full precision.
    """
    shown = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{shown}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{shown}: is a directory, not an image file")

    with _pillow_bomb_check_off():
        try:
            with Image.open(path, formats=_READ_FORMATS) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(
                        f"{shown}: image is {w}x{h} = {_fmt_pixels(w * h)}, above the limit of "
                        f"{_fmt_pixels(max_pixels)} (raise it with {hint('max_pixels=', '--max-pixels')})"
                    )
                fmt = im.format or None
                rawmode = _tile_rawmode(im)
                if fmt in ("PNG", "TIFF") and not im.mode.startswith("I") and ";16" in rawmode:
                    # 16 bits per channel colour (or gray + alpha): Pillow would truncate it.
                    orientation = _exif_orientation(im)
                    return _read_16bit_cv2(path, shown, rawmode, orientation, fmt)
                im.load()
                orientation = _exif_orientation(im)
                if orientation != 1:
                    im = im.transpose(_PIL_TRANSPOSE[orientation])
                data = from_pil(im)
                data.format = fmt
                return data
        except ImageError as e:
            if not str(e).startswith(shown):
                raise ImageError(f"{shown}: {e}") from e
            raise
        except UnidentifiedImageError as e:
            if _looks_like_image(path):  # right signature, but no plugin could parse the header
                raise ImageError(f"{shown}: cannot decode image (truncated or corrupt file)") from e
            raise ImageError(
                f"{shown}: not a supported image file (expected PNG, JPEG, WebP, TIFF or BMP)"
            ) from e
        except FileNotFoundError as e:
            raise ImageError(f"{shown}: no such file") from e
        except PermissionError as e:
            raise ImageError(f"{shown}: permission denied") from e
        except MemoryError:
            raise
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error...
            raise ImageError(
                f"{shown}: cannot decode image (truncated or corrupt file: {_one_line(e)})"
            ) from e


def _looks_like_image(path: str | os.PathLike) -> bool:
    """Whether the file starts with the signature of one of the formats read_image supports."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head.startswith(
        (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM")
    ) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _read_16bit_cv2(
    path: str | os.PathLike, shown: str, rawmode: str, orientation: int, fmt: str | None
) -> ImageData:
    import cv2  # lazy: only 16-bit colour files need OpenCV for reading

    buf = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)  # IMREAD_UNCHANGED also ignores EXIF orientation
    if arr is None or arr.size == 0:
        raise ImageError(f"{shown}: cannot decode image (truncated or corrupt file)")
    if arr.dtype == np.uint16:
        scale, bits = 65535.0, 16
    elif arr.dtype == np.uint8:
        scale, bits = 255.0, 8
    else:
        raise ImageError(f"{shown}: unsupported sample type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    gray_alpha = rawmode.startswith("LA")
    alpha = None
    if arr.shape[2] == 4:
        alpha = arr[..., 3]
        pix = arr[..., :1] if gray_alpha else arr[..., 2::-1]
    elif arr.shape[2] == 3:
        pix = arr[..., 2::-1]
    elif arr.shape[2] == 2:
        pix, alpha = arr[..., :1], arr[..., 1]
    else:
        pix = arr
    pix = _orient_array(pix, orientation)
    pixels = _unit_float(pix, scale)
    if alpha is not None:
        alpha = _unit_float(_orient_array(alpha, orientation), scale)
    return ImageData(pixels, alpha, bits, fmt)


# --------------------------------------------------------------------------------------------
# writing


def _format_for(path: Path) -> str:
    fmt = _FORMAT_BY_EXT.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(
            f"{path}: unknown image extension {path.suffix!r} (use one of {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return fmt


def write_image(
    path: str | os.PathLike,
    image: ImageData,
    *,
    overwrite: bool = False,
    quality: int = 95,
    text: dict[str, str] | None = None,
) -> Path:
    """Encode ``image`` to ``path`` (format from the extension) atomically and return the Path.

    16-bit images are written as 16-bit PNG/TIFF; JPEG, WebP and BMP get 8 bits. 16-bit gray +
    alpha has no common 16-bit file layout through our encoders, so it is written as 16-bit RGBA
    (gray replicated). Alpha is kept for PNG, WebP, TIFF and BMP (32-bit BGRA); JPEG with alpha
    raises ImageError. ``quality`` (1-100) applies to JPEG and WebP. ``text`` (PNG only) is stored
    as tEXt chunks (Latin-1 keys and values). An existing file is only replaced with
    ``overwrite=True``. Parent directories are created.
    """
    path = Path(path)
    fmt = _format_for(path)
    try:
        q = operator.index(quality) if not isinstance(quality, bool) else None
    except TypeError:
        q = None
    if q is None or not 1 <= q <= 100:
        raise ImageError(f"{path}: quality must be an integer from 1 to 100, got {quality!r}")
    quality = q
    if image.has_alpha and fmt == "JPEG":
        raise ImageError(f"{path}: JPEG cannot store alpha; use .png")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    if not overwrite and os.path.lexists(path):
        raise ImageError(f"{path}: exists (pass {hint('overwrite=True', '--overwrite')})")

    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"{path}: cannot create folder {parent} ({_one_line(e)})") from e

    tmp = parent / f".{tmp_stem(path.name)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({_one_line(e)})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if text and fmt == "PNG":
                buf = io.BytesIO()
                _encode(image, fmt, quality, buf, path)
                f.write(png_with_text(buf.getvalue(), text))
            else:
                _encode(image, fmt, quality, f, path)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_no_clobber(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, ImageError):
            raise
        if isinstance(e, (OSError, ValueError)) and not isinstance(e, MemoryError):
            raise ImageError(f"{path}: cannot write image ({_one_line(e)})") from e
        raise
    _fsync_dir(parent)
    return path


def png_with_text(data: bytes, text: dict[str, str]) -> bytes:
    """PNG bytes with a tEXt chunk per (key, value) inserted after IHDR (PNG spec §11.3.4.3)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ImageError("not a PNG stream")
    end = 8 + 8 + int.from_bytes(data[8:12], "big") + 4  # signature, IHDR header + data + CRC
    chunks = []
    for key, value in text.items():
        body = key.encode("latin-1")[:79] + b"\0" + str(value).encode("latin-1", "replace")
        chunks.append(len(body).to_bytes(4, "big") + b"tEXt" + body
                      + zlib.crc32(b"tEXt" + body).to_bytes(4, "big"))  # fmt: skip
    return data[:end] + b"".join(chunks) + data[end:]


def _publish_no_clobber(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (race-free where hard links work)."""
    try:
        os.link(tmp, path)
    except FileExistsError as e:
        raise ImageError(f"{path}: exists (pass {hint('overwrite=True', '--overwrite')})") from e
    except OSError:  # file system without hard links: check, then rename
        if os.path.lexists(path):
            raise ImageError(f"{path}: exists (pass {hint('overwrite=True', '--overwrite')})") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _encode(image: ImageData, fmt: str, quality: int, f: IO[bytes], path: Path) -> None:
    """Write the encoded bytes of ``image`` in format ``fmt`` to the open file ``f``."""
    if image.bit_depth == 16 and fmt in _SIXTEEN_BIT_FORMATS:
        if image.is_gray and not image.has_alpha:
            Image.fromarray(_quantize(image.pixels[..., 0], 16)).save(
                f, format=fmt, **_pil_params(fmt, quality)
            )
            return
        rgb = image.pixels if not image.is_gray else np.repeat(image.pixels, 3, axis=2)
        bgr = _quantize(rgb[..., ::-1], 16)
        if image.alpha is not None:
            bgr = np.concatenate([bgr, _quantize(image.alpha, 16)[..., None]], axis=-1)
        _cv2_encode(np.ascontiguousarray(bgr), ".png" if fmt == "PNG" else ".tiff", f, path)
        return

    arr = _to_uint8_layout(image)
    if fmt == "BMP" and image.has_alpha:
        # Pillow writes 32-bit BMPs whose fourth byte readers ignore; OpenCV writes a V5 header
        # with an alpha mask, which Pillow and OpenCV both read back as alpha.
        rgba = (
            arr
            if arr.shape[2] == 4
            else np.concatenate([np.repeat(arr[..., :1], 3, axis=2), arr[..., 1:]], axis=2)
        )
        _cv2_encode(np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]), ".bmp", f, path)
        return
    im = Image.fromarray(arr)
    if fmt == "WEBP" and im.mode in ("L", "LA"):  # WebP has no gray modes
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    im.save(f, format=fmt, **_pil_params(fmt, quality))


def _pil_params(fmt: str, quality: int) -> dict[str, Any]:
    if fmt in ("JPEG", "WEBP"):
        return {"quality": quality}
    if fmt == "TIFF":
        from PIL import features

        return {"compression": "tiff_lzw"} if features.check("libtiff") else {}
    return {}


def _cv2_encode(arr: np.ndarray, ext: str, f: IO[bytes], path: Path) -> None:
    import cv2  # lazy: only 16-bit colour and BMP + alpha need OpenCV for writing

    ok, buf = cv2.imencode(ext, arr)
    if not ok:
        raise ImageError(f"{path}: OpenCV could not encode the image as {ext}")
    f.write(buf.tobytes())


# --------------------------------------------------------------------------------------------
# folders and output names


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, PurePath]]:
    """Expand files and folders into ``(path, rel)`` pairs; ``rel`` has no extension.

    A file is returned as ``(path, PurePath(stem))`` whatever its extension (a file named
    explicitly must not vanish silently; decoding will report it). A folder yields every image
    file below it, recursively, sorted by relative path, with ``rel`` the relative path without
    extension (``sub/a``); non-image and hidden (".name") files and folders are skipped,
    symlinked folders are not followed. Missing inputs raise ImageError. The same file reached
    twice is listed once (first occurrence).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[tuple[Path, PurePath]] = []
    seen: set[str] = set()

    def add(p: Path, rel: PurePath) -> None:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            found.append((p, rel))

    for item in inputs:
        root = Path(item)
        if not root.exists():
            raise ImageError(f"{os.fspath(item)}: no such file or directory")
        if not root.is_dir():
            add(root, PurePath(root.stem))
            continue
        entries: list[tuple[tuple[str, ...], Path]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            relparts = Path(dirpath).relative_to(root).parts
            for fn in filenames:
                if fn.startswith(".") or not _is_image_name(fn):
                    continue
                full = Path(dirpath, fn)
                if not full.is_file():  # broken symlink, socket, ...
                    continue
                entries.append(((*relparts, fn), full))
        entries.sort(key=lambda e: e[0])
        for parts, full in entries:
            add(full, PurePath(*parts[:-1], os.path.splitext(parts[-1])[0]))
    return found


def _normalize_ext(ext: str) -> str:
    e = ext.strip().lower()
    if not e.startswith("."):
        e = "." + e
    if e not in IMAGE_EXTENSIONS:
        raise ImageError(
            f"output extension {ext!r} is not supported (use one of {', '.join(sorted(IMAGE_EXTENSIONS))} or 'input')"
        )
    return e


def probe_alpha(path: str | os.PathLike) -> bool:
    """Whether :func:`read_image` will give ``path`` an alpha plane, from its header only (no decode;
    False when the header cannot be read: reading it later reports the error)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
                return True
            return mode in ("P", "L", "RGB") and "transparency" in im.info
    except Exception:
        return False


def tmp_stem(name: str, limit: int = 200) -> str:
    """`name` cut to at most `limit` UTF-8 bytes (on a character boundary), for temporary files next
    to it: a legal output name of 255 bytes must not give an illegal temporary name."""
    raw = name.encode("utf-8", "surrogateescape")
    return name if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


def output_path(
    outdir: str | os.PathLike,
    rel: PurePath,
    source: Path,
    *,
    ext: str | None = None,
    has_alpha: bool = False,
    suffix: str = "",
) -> Path:
    """Where the result for ``source`` (found as ``rel``) goes: ``outdir/rel`` + suffix.

    ``ext=None`` -> ".png"; ``ext="input"`` -> the source's lower-case suffix (".png" when the
    source has no supported image suffix); any other value ("jpg", ".webp") -> that extension,
    validated. Alpha output never goes to JPEG: ".jpg"/".jpeg" become ".png" when ``has_alpha``.
    The extension is appended (``rel`` "a.b" -> "a.b.png"), never substituted; ``suffix`` (e.g.
    "_out", Real-ESRGAN's ``--suffix``) goes between the name and the extension ("a.b_out.png").
    """
    if any(c in suffix for c in "/\\\0"):
        raise ImageError(f"suffix {suffix!r} must not contain path separators")
    rel = PurePath(rel)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ImageError(f"{rel}: output name must be a non-empty relative path without '..'")
    if ext is None:
        ext_ = ".png"
    elif ext.strip().lower() == "input":
        ext_ = Path(source).suffix.lower()
        if ext_ not in IMAGE_EXTENSIONS:
            ext_ = ".png"
    else:
        ext_ = _normalize_ext(ext)
    if has_alpha and ext_ in (".jpg", ".jpeg"):
        ext_ = ".png"
    return Path(outdir).joinpath(*rel.parts[:-1], rel.parts[-1] + suffix + ext_)
