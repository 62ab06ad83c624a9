"""Tests for diffsr.io: decoding, encoding, conversions, folder walking and output names."""

from __future__ import annotations

import io as _bytesio
import os
import struct
import warnings
import zlib
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import diffsr.io as dio
from diffsr.errors import DiffSRError, ImageError, cli_messages
from diffsr.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageData,
    find_images,
    from_array,
    from_pil,
    output_path,
    read_image,
    to_array,
    to_pil,
    write_image,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _noise(h: int, w: int, c: int | None = 3, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    hi = 256 if dtype == np.uint8 else 65536
    shape = (h, w) if c is None else (h, w, c)
    return _rng(seed).integers(0, hi, shape).astype(dtype)


def _smooth_rgb(h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    r = 40 + 160 * x / (w - 1)
    g = 30 + 180 * y / (h - 1)
    b = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """Minimal 16-bit PNG encoder (used for gray + alpha, which neither Pillow nor OpenCV writes)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _insert_after_ihdr(png: bytes, chunk: bytes) -> bytes:
    end_of_ihdr = 8 + 4 + 4 + 13 + 4
    assert png[12:16] == b"IHDR"
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def _exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _expected_orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """What the displayed image looks like, computed with PIL's own exif_transpose."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    im = Image.fromarray(np.ascontiguousarray(a))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    im.getexif()[0x0112] = orientation
    return np.asarray(ImageOps.exif_transpose(im))


def _u16_rgb(data: ImageData) -> np.ndarray:
    return to_array(data, np.zeros((1, 1, 3), np.uint16))


def _open_fds() -> int | None:
    fd_dir = "/proc/self/fd"
    return len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# constants and ImageData


def test_constants():
    assert IMAGE_EXTENSIONS == frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
    assert DEFAULT_MAX_PIXELS == 1 << 24
    assert issubclass(ImageError, DiffSRError)


def test_imagedata_properties_and_validation():
    d = ImageData(np.zeros((4, 5, 3), np.float32), np.ones((4, 5), np.float32), 8)
    assert (d.height, d.width, d.is_gray, d.has_alpha, d.format) == (4, 5, False, True, None)
    g = ImageData(np.zeros((4, 5, 1), np.float64), None, 16, "PNG")
    assert g.pixels.dtype == np.float32 and g.is_gray and not g.has_alpha
    with pytest.raises(ImageError, match=r"\(4, 5, 2\)"):
        ImageData(np.zeros((4, 5, 2), np.float32), None, 8)
    with pytest.raises(ImageError, match="alpha"):
        ImageData(np.zeros((4, 5, 3), np.float32), np.zeros((5, 4), np.float32), 8)
    with pytest.raises(ImageError, match="bit_depth"):
        ImageData(np.zeros((4, 5, 3), np.float32), None, 12)


# ---------------------------------------------------------------------------------------------
# 8-bit round trips


@pytest.mark.parametrize(
    ("ext", "fmt"), [(".png", "PNG"), (".tif", "TIFF"), (".tiff", "TIFF"), (".bmp", "BMP")]
)
def test_lossless_rgb_round_trip(tmp_path, ext, fmt):
    a = _noise(13, 17)
    out = write_image(tmp_path / f"x{ext}", from_array(a))
    assert out == tmp_path / f"x{ext}" and out.is_file()
    d = read_image(out)
    assert d.pixels.dtype == np.float32 and d.pixels.shape == (13, 17, 3)
    assert (d.bit_depth, d.format, d.alpha) == (8, fmt, None)
    assert 0.0 <= d.pixels.min() and d.pixels.max() <= 1.0
    np.testing.assert_array_equal(to_array(d, a), a)


@pytest.mark.parametrize(
    ("ext", "fmt", "tol"), [(".jpg", "JPEG", 4.0), (".jpeg", "JPEG", 4.0), (".webp", "WEBP", 4.0)]
)
def test_lossy_rgb_round_trip(tmp_path, ext, fmt, tol):
    a = _smooth_rgb()
    out = write_image(tmp_path / f"x{ext}", from_array(a), quality=95)
    d = read_image(out)
    assert (d.format, d.bit_depth, d.pixels.shape, d.has_alpha) == (fmt, 8, (32, 48, 3), False)
    diff = np.abs(to_array(d, a).astype(int) - a.astype(int))
    assert diff.mean() < tol


def test_quality_changes_jpeg_size(tmp_path):
    a = _noise(32, 32)
    lo = write_image(tmp_path / "lo.jpg", from_array(a), quality=10).stat().st_size
    hi = write_image(tmp_path / "hi.jpg", from_array(a), quality=95).stat().st_size
    assert lo < hi
    assert write_image(tmp_path / "np.jpg", from_array(a), quality=np.int64(80)).is_file()
    for bad in (0, 101, 9.5, True, "95"):
        with pytest.raises(ImageError, match="quality"):
            write_image(tmp_path / "bad.jpg", from_array(a), quality=bad)


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_rgba_keeps_alpha_exactly(tmp_path, ext):
    a = _noise(9, 11, 4, seed=3)
    a[0, 0, 3], a[0, 1, 3] = 0, 255
    d = read_image(write_image(tmp_path / f"x{ext}", from_array(a)))
    assert d.has_alpha and d.alpha.shape == (9, 11) and d.alpha.dtype == np.float32
    assert d.alpha[0, 0] == 0.0 and d.alpha[0, 1] == 1.0
    np.testing.assert_array_equal(to_array(d, a), a)


def test_rgba_webp_keeps_alpha(tmp_path):
    a = np.concatenate([_smooth_rgb(), _noise(32, 48, 1, seed=4)], axis=-1)
    d = read_image(write_image(tmp_path / "x.webp", from_array(a)))
    assert d.has_alpha
    back = to_array(d, a)
    np.testing.assert_array_equal(back[..., 3], a[..., 3])  # WebP alpha is lossless by default


def test_bmp_alpha_readable_by_pillow_and_opencv(tmp_path):
    a = _noise(5, 6, 4, seed=8)
    out = write_image(tmp_path / "x.bmp", from_array(a))
    with Image.open(out) as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im), a)
    np.testing.assert_array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]], a)


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp", ".jpg"])
def test_gray_stays_gray(tmp_path, ext):
    a = _noise(10, 12, None, seed=5) if ext != ".jpg" else _smooth_rgb(10, 12)[..., 0]
    d = read_image(write_image(tmp_path / f"g{ext}", from_array(a)))
    assert d.is_gray and d.pixels.shape == (10, 12, 1) and d.bit_depth == 8
    back = to_array(d, a)
    assert back.shape == (10, 12)
    if ext == ".jpg":
        assert np.abs(back.astype(int) - a.astype(int)).mean() < 3
    else:
        np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray_alpha_round_trip(tmp_path, ext):
    a = _noise(7, 8, 2, seed=6)
    out = write_image(tmp_path / f"ga{ext}", from_array(a))
    with Image.open(out) as im:
        assert im.mode == "LA"
    d = read_image(out)
    assert d.is_gray and d.has_alpha and d.pixels.shape == (7, 8, 1)
    np.testing.assert_array_equal(to_array(d, a), a)


def test_gray_to_webp_is_written_as_rgb(tmp_path):
    a = _smooth_rgb()[..., 1]
    d = read_image(write_image(tmp_path / "g.webp", from_array(a)))
    assert d.pixels.shape == (32, 48, 3)
    assert np.abs(d.pixels.mean(axis=2) * 255 - a).mean() < 4


# ---------------------------------------------------------------------------------------------
# 16-bit reading


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_16bit_gray_exact(tmp_path, ext):
    a = _noise(9, 10, None, np.uint16, seed=1)
    p = tmp_path / f"g16{ext}"
    assert cv2.imwrite(str(p), a)
    d = read_image(p)
    assert (d.bit_depth, d.is_gray, d.has_alpha) == (16, True, False)
    np.testing.assert_array_equal(to_array(d, a), a)


@pytest.mark.parametrize(("ext", "fmt"), [(".png", "PNG"), (".tif", "TIFF")])
def test_read_16bit_rgb_exact(tmp_path, ext, fmt):
    rgb = _noise(9, 10, 3, np.uint16, seed=2)
    p = tmp_path / f"c16{ext}"
    assert cv2.imwrite(str(p), rgb[..., ::-1].copy())  # OpenCV writes BGR
    d = read_image(p)
    assert (d.bit_depth, d.is_gray, d.has_alpha, d.format) == (16, False, False, fmt)
    np.testing.assert_array_equal(to_array(d, rgb), rgb)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_read_16bit_rgba_exact(tmp_path, ext):
    rgba = _noise(6, 7, 4, np.uint16, seed=3)
    p = tmp_path / f"c16a{ext}"
    assert cv2.imwrite(str(p), rgba[..., [2, 1, 0, 3]].copy())
    d = read_image(p)
    assert d.bit_depth == 16 and d.has_alpha and not d.is_gray
    np.testing.assert_array_equal(to_array(d, rgba), rgba)


def test_read_16bit_gray_alpha_png(tmp_path):
    la = _noise(5, 6, 2, np.uint16, seed=9)
    p = tmp_path / "la16.png"
    p.write_bytes(_png16(la, color_type=4))
    d = read_image(p)
    assert d.bit_depth == 16 and d.is_gray and d.has_alpha
    np.testing.assert_array_equal(to_array(d, la), la)


@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_16bit_with_small_values_is_still_16bit(tmp_path, kind):
    shape = (6, 7) if kind == "gray" else (6, 7, 3)
    a = _rng(4).integers(0, 256, shape).astype(np.uint16)
    p = tmp_path / f"small_{kind}.png"
    assert cv2.imwrite(str(p), a if kind == "gray" else a[..., ::-1].copy())
    d = read_image(p)
    assert d.bit_depth == 16
    np.testing.assert_array_equal(to_array(d, a), a)
    assert d.pixels.max() <= 255 / 65535 + 1e-7


def test_read_16bit_colour_non_ascii_path(tmp_path):
    rgb = _noise(4, 5, 3, np.uint16, seed=5)
    folder = tmp_path / "bilder ü"
    folder.mkdir()
    p = folder / "größe ñ.png"
    ok, buf = cv2.imencode(".png", rgb[..., ::-1].copy())
    assert ok
    p.write_bytes(buf.tobytes())
    d = read_image(p)
    assert d.bit_depth == 16
    np.testing.assert_array_equal(to_array(d, rgb), rgb)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, on the cut TIFF
@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_read_16bit_colour_truncated(tmp_path, ext):
    rgb = _noise(40, 40, 3, np.uint16, seed=6)
    ok, buf = cv2.imencode(ext, rgb)
    p = tmp_path / f"cut16{ext}"
    p.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageError, match=rf"cut16\{ext}: cannot decode image"):
        read_image(p)


# ---------------------------------------------------------------------------------------------
# 16-bit writing


def _write_read_16(tmp_path: Path, name: str, a: np.ndarray) -> tuple[np.ndarray, ImageData]:
    out = write_image(tmp_path / name, from_array(a))
    raw = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    return raw, read_image(out)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_write_16bit_gray(tmp_path, ext):
    a = _noise(8, 9, None, np.uint16, seed=11)
    raw, d = _write_read_16(tmp_path, f"g{ext}", a)
    assert raw.dtype == np.uint16 and raw.shape == (8, 9)
    np.testing.assert_array_equal(raw, a)
    assert d.bit_depth == 16 and d.is_gray
    np.testing.assert_array_equal(to_array(d, a), a)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_write_16bit_rgb_and_rgba(tmp_path, ext):
    rgb = _noise(8, 9, 3, np.uint16, seed=12)
    raw, d = _write_read_16(tmp_path, f"c{ext}", rgb)
    assert raw.dtype == np.uint16 and raw.shape == (8, 9, 3)
    np.testing.assert_array_equal(raw[..., ::-1], rgb)
    np.testing.assert_array_equal(to_array(d, rgb), rgb)

    rgba = _noise(8, 9, 4, np.uint16, seed=13)
    raw, d = _write_read_16(tmp_path, f"ca{ext}", rgba)
    assert raw.dtype == np.uint16 and raw.shape == (8, 9, 4)
    np.testing.assert_array_equal(raw[..., [2, 1, 0, 3]], rgba)
    np.testing.assert_array_equal(to_array(d, rgba), rgba)


def test_write_16bit_gray_alpha_becomes_rgba16(tmp_path):
    la = _noise(5, 6, 2, np.uint16, seed=14)
    raw, d = _write_read_16(tmp_path, "ga.png", la)
    assert raw.dtype == np.uint16 and raw.shape == (5, 6, 4)
    for c in range(3):
        np.testing.assert_array_equal(raw[..., c], la[..., 0])
    np.testing.assert_array_equal(raw[..., 3], la[..., 1])
    assert d.bit_depth == 16 and d.has_alpha and not d.is_gray


def test_write_float_input_as_16bit_png(tmp_path):
    f = np.linspace(0, 1, 5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    raw = cv2.imread(str(write_image(tmp_path / "f.png", from_array(f))), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw[..., ::-1], np.rint(f * 65535).astype(np.uint16))


@pytest.mark.parametrize(("ext", "mode"), [(".jpg", "RGB"), (".webp", "RGB"), (".bmp", "RGB")])
def test_16bit_to_8bit_only_formats(tmp_path, ext, mode):
    rgb16 = (_smooth_rgb().astype(np.uint16) * 257).astype(np.uint16)
    out = write_image(tmp_path / f"x{ext}", from_array(rgb16))
    with Image.open(out) as im:
        assert im.mode == mode
        got = np.asarray(im).astype(int)
    assert np.abs(got - _smooth_rgb().astype(int)).mean() < 4
    assert read_image(out).bit_depth == 8


def test_8bit_png_is_written_as_8bit(tmp_path):
    a = _noise(4, 4)
    raw = cv2.imread(str(write_image(tmp_path / "e.png", from_array(a))), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_array_matches_pil(orientation):
    a = _noise(3, 5, 3, seed=orientation)
    np.testing.assert_array_equal(dio._orient_array(a, orientation), _expected_orient(a, orientation))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_all(tmp_path, orientation):
    a = _noise(3, 5, 3, seed=20)
    p = tmp_path / f"o{orientation}.png"
    Image.fromarray(a).save(p, exif=_exif_bytes(orientation))
    d = read_image(p)
    np.testing.assert_array_equal(to_array(d, a), _expected_orient(a, orientation))


def test_exif_orientation_6_and_3_explicit(tmp_path):
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # asymmetric 2x3
    for orientation, expected in ((6, np.rot90(a, -1)), (3, a[::-1, ::-1])):
        p = tmp_path / f"o{orientation}.png"
        Image.fromarray(a).save(p, exif=_exif_bytes(orientation))
        d = read_image(p)
        assert d.pixels.shape[:2] == expected.shape[:2]
        np.testing.assert_array_equal(to_array(d, a), expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_jpeg(tmp_path, orientation):
    a = _smooth_rgb(16, 24)
    p1, po = tmp_path / "o1.jpg", tmp_path / f"o{orientation}.jpg"
    Image.fromarray(a).save(p1, quality=95)
    Image.fromarray(a).save(po, quality=95, exif=_exif_bytes(orientation))
    upright = to_array(read_image(p1), a)
    got = to_array(read_image(po), a)
    np.testing.assert_array_equal(got, dio._orient_array(upright, orientation))
    assert got.shape == ((24, 16, 3) if orientation in (6, 8) else (16, 24, 3))


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_16bit_colour_png(tmp_path, orientation):
    rgb = _noise(3, 5, 3, np.uint16, seed=21)
    ok, buf = cv2.imencode(".png", rgb[..., ::-1].copy())
    exif = _exif_bytes(orientation)
    exif = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    p = tmp_path / f"o{orientation}_16.png"
    p.write_bytes(_insert_after_ihdr(buf.tobytes(), _png_chunk(b"eXIf", exif)))
    d = read_image(p)
    assert d.bit_depth == 16
    expected = np.rot90(rgb, -1) if orientation == 6 else rgb[::-1, ::-1]
    np.testing.assert_array_equal(to_array(d, rgb), expected)


def test_written_file_has_no_orientation(tmp_path):
    a = _noise(3, 5, 3, seed=22)
    p = tmp_path / "o6.png"
    Image.fromarray(a).save(p, exif=_exif_bytes(6))
    out = write_image(tmp_path / "out.png", read_image(p))
    with Image.open(out) as im:
        assert im.getexif().get(0x0112, 1) == 1
    np.testing.assert_array_equal(to_array(read_image(out), a), np.rot90(a, -1))


# ---------------------------------------------------------------------------------------------
# pixel limit


def test_pixel_limit_from_header_without_decoding(tmp_path):
    png = bytearray()
    buf = _bytesio.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    p = tmp_path / "bomb.png"
    p.write_bytes(bytes(png))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageError) as ei:
            read_image(p)
    msg = str(ei.value)
    assert msg.startswith(str(p) + ": ")
    assert "100000x100000 = 10000.0 MP" in msg and "16.8 MP" in msg and "max_pixels" in msg
    assert "\n" not in msg
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global restored


def test_pixel_limit_small(tmp_path):
    p = write_image(tmp_path / "sq.png", from_array(_noise(40, 40)))
    with pytest.raises(
        ImageError, match=r"sq\.png: image is 40x40 = 1600 pixels, above the limit of 1000 pixels"
    ):
        read_image(p, max_pixels=1000)
    assert read_image(p, max_pixels=1600).width == 40


def test_pixel_limit_applies_to_16bit_colour(tmp_path):
    p = tmp_path / "c16.png"
    cv2.imwrite(str(p), _noise(40, 40, 3, np.uint16))
    with pytest.raises(ImageError, match="above the limit"):
        read_image(p, max_pixels=1000)


def test_no_limit_overrides_pillow_bomb_check(tmp_path, monkeypatch):
    p = write_image(tmp_path / "big.png", from_array(_noise(30, 30)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would raise (900 > 2 * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = read_image(p, max_pixels=None)
    assert d.width == 30
    assert Image.MAX_IMAGE_PIXELS == 100  # restored afterwards


# ---------------------------------------------------------------------------------------------
# read errors


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file") as ei:
        read_image(tmp_path / "nope.png")
    _assert_one_line_naming(ei, tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory") as ei:
        read_image(tmp_path)
    _assert_one_line_naming(ei, tmp_path)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match="not a supported image file") as ei:
        read_image(p)
    _assert_one_line_naming(ei, p)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, on the cut TIFF
@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp", ".tif"])
def test_truncated_file(tmp_path, ext):
    good = write_image(tmp_path / f"good{ext}", from_array(_noise(64, 64)))
    data = good.read_bytes()
    p = tmp_path / f"cut{ext}"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode image") as ei:
        read_image(p)
    _assert_one_line_naming(ei, p)


def test_corrupt_png_data(tmp_path):
    data = bytearray(write_image(tmp_path / "good.png", from_array(_noise(32, 32))).read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 60] = bytes(50)  # garbage inside the compressed stream
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="cannot decode") as ei:
        read_image(p)
    _assert_one_line_naming(ei, p)


def test_float_tiff_unsupported(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.zeros((3, 4), np.float32)).save(p)
    with pytest.raises(ImageError, match=r"f\.tif: unsupported float image"):
        read_image(p)


def test_16bpp_bmp_565_is_8bit(tmp_path):
    # a 16 bits-per-pixel BMP (5-6-5) has rawmode "BGR;16" but 8-bit precision: no OpenCV path
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    px = (
        ((rgb[..., 0] >> 3).astype("<u2") << 11)
        | ((rgb[..., 1] >> 2).astype("<u2") << 5)
        | (rgb[..., 2] >> 3)
    )
    rows = px[0].astype("<u2").tobytes()
    info = struct.pack("<IiiHHIIiiII", 40, 4, 1, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    info += struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    off = 14 + len(info)
    p = tmp_path / "565.bmp"
    p.write_bytes(b"BM" + struct.pack("<IHHI", off + len(rows), 0, 0, off) + info + rows)
    with Image.open(p) as im:
        assert ";16" in im.tile[0].args[0]
    d = read_image(p)
    assert (d.bit_depth, d.format, d.pixels.shape) == (8, "BMP", (1, 4, 3))
    np.testing.assert_array_equal(to_array(d, rgb), rgb)


def test_unsupported_format_gif_refused(tmp_path):
    p = tmp_path / "a.gif"
    Image.new("P", (4, 4)).save(p)
    with pytest.raises(ImageError, match="not a supported image file"):
        read_image(p)


def test_no_file_handles_left_open(tmp_path):
    before = _open_fds()
    if before is None:
        pytest.skip("no /proc/self/fd")
    good = write_image(tmp_path / "a.png", from_array(_noise(8, 8)))
    p16 = tmp_path / "c16.png"
    cv2.imwrite(str(p16), _noise(8, 8, 3, np.uint16))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])
    for _ in range(3):
        read_image(good)
        read_image(p16)
        with pytest.raises(ImageError):
            read_image(bad)
        with pytest.raises(ImageError):
            read_image(good, max_pixels=10)
    assert _open_fds() == before


# ---------------------------------------------------------------------------------------------
# writing: refusal, overwrite, atomicity


def test_write_refuses_existing_and_overwrites_on_request(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(ImageError, match=r"out\.png: exists \(pass overwrite=True\)$"):
        write_image(target, from_array(_noise(4, 4)))
    with cli_messages(), pytest.raises(ImageError, match=r"out\.png: exists \(pass --overwrite\)$"):
        write_image(target, from_array(_noise(4, 4)))  # the same call made by a diffsr command
    assert target.read_bytes() == b"precious"
    assert _hidden_leftovers(tmp_path) == []
    a = _noise(4, 4, seed=1)
    assert write_image(target, from_array(a), overwrite=True) == target
    np.testing.assert_array_equal(to_array(read_image(target), a), a)
    assert _hidden_leftovers(tmp_path) == []


def test_write_creates_parents_and_accepts_str(tmp_path):
    out = write_image(str(tmp_path / "a" / "b" / "c.tiff"), from_array(_noise(4, 4)))
    assert isinstance(out, Path) and out.is_file()


def test_write_errors(tmp_path):
    rgba = from_array(_noise(4, 4, 4))
    with pytest.raises(ImageError, match=r"x\.jpg: JPEG cannot store alpha; use \.png"):
        write_image(tmp_path / "x.jpg", rgba)
    with pytest.raises(ImageError, match=r"x\.gif: unknown image extension"):
        write_image(tmp_path / "x.gif", rgba)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        write_image(tmp_path / "d.png", rgba, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]


def _failing_save(exc: BaseException):
    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial data")
        raise exc

    return save


@pytest.mark.parametrize("overwrite", [False, True])
def test_write_atomic_on_encoder_failure(tmp_path, monkeypatch, overwrite):
    target = tmp_path / "out.png"
    if overwrite:
        target.write_bytes(b"old")
    monkeypatch.setattr(Image.Image, "save", _failing_save(OSError("disk full")))
    with pytest.raises(ImageError, match=r"out\.png: cannot write image \(disk full\)"):
        write_image(target, from_array(_noise(4, 4)), overwrite=overwrite)
    if overwrite:
        assert target.read_bytes() == b"old"
    else:
        assert not target.exists()
    assert _hidden_leftovers(tmp_path) == []


def test_write_atomic_other_exceptions_propagate(tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _failing_save(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        write_image(tmp_path / "sub" / "out.png", from_array(_noise(4, 4)))
    assert list((tmp_path / "sub").iterdir()) == []


def test_write_atomic_cv2_path(tmp_path, monkeypatch):
    def bad_imencode(*args, **kwargs):
        raise cv2.error("encoder exploded")

    monkeypatch.setattr(cv2, "imencode", bad_imencode)
    with pytest.raises(cv2.error):
        write_image(tmp_path / "c16.png", from_array(_noise(4, 4, 3, np.uint16)))
    assert list(tmp_path.iterdir()) == []


def test_target_appearing_during_encode_is_not_clobbered(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    real_save = Image.Image.save

    def racing_save(self, fp, *args, **kwargs):
        target.write_bytes(b"someone else")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", racing_save)
    with pytest.raises(ImageError, match="exists"):
        write_image(target, from_array(_noise(4, 4)))
    assert target.read_bytes() == b"someone else"
    assert _hidden_leftovers(tmp_path) == []


def test_write_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_link)
    a = _noise(4, 4)
    out = write_image(tmp_path / "x.png", from_array(a))
    np.testing.assert_array_equal(to_array(read_image(out), a), a)
    with pytest.raises(ImageError, match="exists"):
        write_image(out, from_array(a))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_temp_file_is_hidden_and_in_same_folder(tmp_path, monkeypatch):
    seen = []
    real_save = Image.Image.save

    def spy(self, fp, *args, **kwargs):
        seen.extend(tmp_path / name for name in _hidden_leftovers(tmp_path))  # the temp file, while encoding
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", spy)
    write_image(tmp_path / "x.png", from_array(_noise(4, 4)))
    assert len(seen) == 1
    assert seen[0].name.startswith(f".x.png.{os.getpid()}.") and seen[0].name.endswith(".tmp")
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---------------------------------------------------------------------------------------------
# PIL conversions


def test_palette_with_and_without_transparency(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    p_im = Image.frombytes("P", (3, 2), idx.tobytes())
    p_im.putpalette(pal)
    p = tmp_path / "pt.png"
    p_im.save(p, transparency=1)
    d = read_image(p)
    assert d.has_alpha and not d.is_gray and d.bit_depth == 8
    np.testing.assert_array_equal(d.alpha, (idx != 1).astype(np.float32))
    np.testing.assert_array_equal(to_array(d, np.zeros((1, 1, 3), np.uint8))[0, 0], [255, 0, 0, 255])
    d2 = from_pil(p_im)
    assert not d2.has_alpha and d2.pixels.shape == (2, 3, 3)
    np.testing.assert_array_equal(d2.pixels[1, 0], [0, 0, 1])


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(_smooth_rgb(16, 16)).convert("CMYK")
    p = tmp_path / "cmyk.jpg"
    cmyk.save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
        ref = np.asarray(im.convert("RGB"))
    d = read_image(p)
    assert (d.format, d.bit_depth, d.pixels.shape) == ("JPEG", 8, (16, 16, 3))
    np.testing.assert_array_equal(to_array(d, ref), ref)
    assert np.abs(ref.astype(int) - _smooth_rgb(16, 16).astype(int)).mean() < 6


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_other_colour_modes_become_rgb(mode):
    src = Image.fromarray(_smooth_rgb(8, 8))
    im = src.convert(mode) if mode != "LAB" else Image.frombytes("LAB", (8, 8), bytes(8 * 8 * 3))
    d = from_pil(im)
    assert d.pixels.shape == (8, 8, 3) and d.bit_depth == 8 and not d.has_alpha
    np.testing.assert_array_equal(to_array(d, np.zeros((1, 1, 3), np.uint8)), np.asarray(im.convert("RGB")))


def test_mode_1_and_premultiplied_modes():
    bw = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    d = from_pil(bw)
    assert d.is_gray and d.bit_depth == 8
    np.testing.assert_array_equal(d.pixels[..., 0], [[0, 1], [1, 0]])

    rgba = Image.fromarray(np.full((2, 2, 4), 255, np.uint8))
    for mode, gray in (("RGBa", False), ("La", True), ("PA", False)):
        im = rgba.convert(mode) if mode != "PA" else rgba.convert("RGB").convert("P").convert("PA")
        d = from_pil(im)
        assert d.has_alpha and d.is_gray == gray, mode
        np.testing.assert_allclose(d.alpha, 1.0)


def test_integer_modes():
    a16 = np.array([[0, 1, 65535]], np.uint16)
    for mode in ("I;16", "I;16B", "I;16L"):
        im = Image.frombytes(mode, (3, 1), a16.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        d = from_pil(im)
        assert d.bit_depth == 16 and d.is_gray, mode
        np.testing.assert_array_equal(to_array(d, a16), a16)
    i32 = Image.frombytes("I", (4, 1), np.array([[-5, 0, 300, 70000]], "<i4").tobytes())
    d = from_pil(i32)
    assert d.bit_depth == 16 and d.is_gray
    np.testing.assert_array_equal(to_array(d, a16)[0], [0, 0, 300, 65535])
    with pytest.raises(ImageError, match="unsupported float image"):
        from_pil(Image.new("F", (2, 2)))


def test_read_int32_tiff_as_16bit(tmp_path):
    p = tmp_path / "i.tif"
    Image.frombytes("I", (3, 1), np.array([[1, 1000, 65535]], "<i4").tobytes()).save(p)
    d = read_image(p)
    assert d.bit_depth == 16 and d.is_gray
    np.testing.assert_array_equal(to_array(d, np.zeros((1, 1), np.uint16)), [[1, 1000, 65535]])


def test_tRNS_colour_key_becomes_alpha(tmp_path):
    p = tmp_path / "key.png"
    Image.fromarray(np.array([[[1, 2, 3], [9, 9, 9]]], np.uint8)).save(p, transparency=(1, 2, 3))
    d = read_image(p)
    assert d.has_alpha
    np.testing.assert_array_equal(d.alpha, [[0.0, 1.0]])


def test_to_pil_modes():
    assert to_pil(from_array(_noise(2, 3, None))).mode == "L"
    assert to_pil(from_array(_noise(2, 3, 2))).mode == "LA"
    assert to_pil(from_array(_noise(2, 3, 3))).mode == "RGB"
    assert to_pil(from_array(_noise(2, 3, 4))).mode == "RGBA"
    g16 = _noise(2, 3, None, np.uint16)
    im = to_pil(from_array(g16))
    assert im.mode == "I;16" and im.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(im), g16)
    rgb16 = _noise(2, 3, 3, np.uint16)
    im = to_pil(from_array(rgb16))
    assert im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), np.rint(rgb16 / 257).astype(np.uint8))
    assert to_pil(from_array(_noise(2, 3, 4, np.uint16))).mode == "RGBA"
    assert to_pil(from_array(_noise(2, 3, 2, np.uint16))).mode == "LA"


def test_from_pil_to_pil_round_trip():
    for a in (_noise(3, 4, None), _noise(3, 4, 2), _noise(3, 4, 3), _noise(3, 4, 4)):
        np.testing.assert_array_equal(np.asarray(to_pil(from_pil(Image.fromarray(a)))), a)


# ---------------------------------------------------------------------------------------------
# numpy conversions


@pytest.mark.parametrize("shape", [(5, 6), (5, 6, 1), (5, 6, 2), (5, 6, 3), (5, 6, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32, np.float64])
def test_from_to_array(shape, dtype):
    if np.issubdtype(dtype, np.integer):
        a = _rng(1).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
        a.flat[0], a.flat[1] = 0, np.iinfo(dtype).max
    else:
        a = _rng(1).random(shape).astype(dtype)
    d = from_array(a)
    channels = 1 if len(shape) == 2 else shape[2]
    assert d.pixels.dtype == np.float32 and d.pixels.shape == (5, 6, 1 if channels <= 2 else 3)
    assert d.is_gray == (channels <= 2) and d.has_alpha == (channels in (2, 4))
    assert d.bit_depth == (8 if dtype == np.uint8 else 16)
    assert d.format is None
    back = to_array(d, a)
    assert back.dtype == a.dtype and back.shape == a.shape
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(back, a)
    else:
        np.testing.assert_allclose(back.astype(np.float64), a.astype(np.float64), atol=1e-6)


def test_from_array_float_clipping_and_non_finite():
    d = from_array(np.array([[-0.5, 0.25, 1.5]], np.float64))
    np.testing.assert_array_equal(d.pixels[0, :, 0], [0.0, 0.25, 1.0])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ImageError, match="non-finite"):
            from_array(np.array([[0.1, bad]], np.float32))


@pytest.mark.parametrize("dtype", [bool, np.int32, np.int8, np.uint32, np.complex64])
def test_from_array_bad_dtype(dtype):
    with pytest.raises(ImageError, match="dtype"):
        from_array(np.zeros((2, 2), dtype))


@pytest.mark.parametrize("shape", [(5,), (5, 6, 5), (2, 5, 6, 3), (5, 6, 0), (0, 6, 3)])
def test_from_array_bad_shape(shape):
    with pytest.raises(ImageError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        from_array(np.zeros(shape, np.uint8))


def test_to_array_layout_follows_image():
    gray = from_array(_noise(3, 4, None))
    assert to_array(gray, np.zeros((1, 1), np.uint8)).shape == (3, 4)
    assert to_array(gray, np.zeros((1, 1, 1), np.uint8)).shape == (3, 4, 1)
    rgb = from_array(_noise(3, 4, 3))
    assert to_array(rgb, np.zeros((1, 1), np.uint8)).shape == (3, 4, 3)  # cannot be 2-D
    rgba = from_array(_noise(3, 4, 4))
    out = to_array(rgba, np.zeros((1, 1, 3), np.float32))
    assert out.shape == (3, 4, 4) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    g8 = to_array(from_array(np.array([[0.5]], np.float32)), np.zeros((1, 1), np.uint8))
    assert g8.tolist() == [[128]]
    with pytest.raises(ImageError, match="dtype"):
        to_array(rgb, np.zeros((1, 1), np.int64))


# ---------------------------------------------------------------------------------------------
# find_images


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_find_images_tree(tmp_path):
    root = tmp_path / "in"
    for rel in ("b.png", "A.JPG", "sub/c.webp", "sub/deep/d.tiff", "sub/e.jpeg", "z.bmp", "m.Tif"):
        _touch(root / rel)
    for rel in ("notes.txt", "sub/readme.md", ".hidden.png", ".git/x.png", "sub/.cache/y.png", "noext"):
        _touch(root / rel)
    (root / "sub" / "folder.png").mkdir()  # a folder with an image-like name is not a file
    os.symlink(root, root / "sub" / "loop")  # a loop that must not hang
    os.symlink(root / "missing.png", root / "dangling.png")

    got = find_images([root])
    rels = [r.as_posix() for _, r in got]
    assert rels == ["A", "b", "m", "sub/c", "sub/deep/d", "sub/e", "z"]
    assert all(isinstance(r, PurePath) and isinstance(p, Path) for p, r in got)
    assert [p for p, _ in got][3] == root / "sub" / "c.webp"
    assert find_images([str(root)]) == got  # deterministic, str accepted


def test_find_images_files_duplicates_and_missing(tmp_path):
    root = tmp_path / "in"
    a = _touch(root / "a.png")
    _touch(root / "sub" / "b.jpg")
    txt = _touch(tmp_path / "explicit.txt")
    hidden = _touch(tmp_path / ".dot.png")

    got = find_images([a, root, txt, hidden, root / "sub" / ".." / "a.png"])
    assert [(p, r.as_posix()) for p, r in got] == [
        (a, "a"),
        (root / "sub" / "b.jpg", "sub/b"),
        (txt, "explicit"),  # named explicitly: kept, decoding will report it
        (hidden, ".dot"),
    ]
    with pytest.raises(ImageError, match=r"nothere\.png: no such file or directory"):
        find_images([a, tmp_path / "nothere.png"])
    assert find_images([]) == []


def test_find_images_symlinked_file_counts_once(tmp_path):
    root = tmp_path / "in"
    real = _touch(root / "real.png")
    os.symlink(real, root / "alias.png")
    got = find_images([root])
    assert [r.as_posix() for _, r in got] == ["alias"]  # sorted first, same file as real.png


# ---------------------------------------------------------------------------------------------
# output_path


def test_output_path_rules(tmp_path):
    out = tmp_path / "out"
    src_jpg, src_jpeg, src_png = Path("x/a.JPG"), Path("x/a.jpeg"), Path("x/a.png")
    rel = PurePath("sub/a")
    assert output_path(out, rel, src_jpg) == out / "sub" / "a.png"
    assert output_path(str(out), rel, src_png) == out / "sub" / "a.png"
    assert output_path(out, rel, src_jpg, ext="input") == out / "sub" / "a.jpg"
    assert output_path(out, rel, src_jpeg, ext="input") == out / "sub" / "a.jpeg"
    assert output_path(out, rel, src_jpeg, ext="input", has_alpha=True) == out / "sub" / "a.png"
    assert output_path(out, rel, Path("x/a.WebP"), ext="input", has_alpha=True) == out / "sub" / "a.webp"
    assert output_path(out, rel, Path("x/a.gif"), ext="input") == out / "sub" / "a.png"
    assert output_path(out, rel, src_png, ext="jpg") == out / "sub" / "a.jpg"
    assert output_path(out, rel, src_png, ext=".WEBP") == out / "sub" / "a.webp"
    assert output_path(out, rel, src_png, ext="tiff") == out / "sub" / "a.tiff"
    assert output_path(out, rel, src_png, ext="jpg", has_alpha=True) == out / "sub" / "a.png"
    assert output_path(out, PurePath("my.photo"), src_png) == out / "my.photo.png"
    with pytest.raises(ImageError, match="'gif'"):
        output_path(out, rel, src_png, ext="gif")
    with pytest.raises(ImageError, match=r"\.\."):
        output_path(out, PurePath("../escape"), src_png)


def test_find_images_then_output_path(tmp_path):
    root = tmp_path / "in"
    _touch(root / "sub" / "p.jpeg")
    ((path, rel),) = find_images([root])
    assert output_path(tmp_path / "o", rel, path, ext="input") == tmp_path / "o" / "sub" / "p.jpeg"
