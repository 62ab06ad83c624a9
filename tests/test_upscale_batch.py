"""Batches through the model (`Upscaler.process_batch`, `diffsr upscale --batch-size`): each image's
result depends on it alone (bit for bit, whatever shares its batch), agrees with one-by-one processing
to float rounding, and a batched run resumed half-way writes the same files as an uninterrupted one."""

from __future__ import annotations

import types

import numpy as np
import pytest
from PIL import Image

from diffsr.api import Upscaler, load
from diffsr.cli import main
from diffsr.errors import ConfigError
from diffsr.io import from_array

TOL = 1e-4  # in [0, 1]: CPU kernels block their sums by batch size (measured max 5e-6 on the tiny model)


def _images(n, h=10, w=9, seed=0):
    rng = np.random.default_rng(seed)
    return [from_array((rng.random((h, w, 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def pisa_up(tiny_sd_dir, pisa_dir):
    return load("pisa", weights=pisa_dir, base=tiny_sd_dir, device="cpu")


@pytest.mark.parametrize(
    "opts",
    [
        {},
        pytest.param({"lambda_pix": 0.5, "lambda_sem": 0.8}, marks=pytest.mark.slow),
        pytest.param({"sample_posterior": True, "seed": 3}, marks=pytest.mark.slow),
    ],
    ids=["default", "adjustable", "posterior"],
)
def test_pisa_batch_is_per_image(pisa_up, opts):
    ims = _images(5)
    one = [pisa_up.process(d, **opts)[0].pixels for d in ims]
    first = pisa_up.process_batch(ims[:3], batch_size=4, **opts)  # 3 images + 1 padding copy
    second = pisa_up.process_batch([ims[4], ims[0]], batch_size=4, **opts)  # other companions, order
    assert np.array_equal(second[1][0].pixels, first[0][0].pixels)  # bit for bit: it depends on a alone
    assert all(abs(a - b[0].pixels).max() < TOL for a, b in zip(one, first, strict=False))
    assert abs(second[0][0].pixels - one[4]).max() < TOL
    assert first[0][0].pixels.shape == (40, 36, 3)


def test_s3diff_batch_with_tiles_modulates_each_image(tiny_sd_dir, s3diff_dir):
    """Tiles and the CFG pair stack copies of the batch; each image keeps its own degradation LoRA."""
    up = load("s3diff", weights=s3diff_dir, base=tiny_sd_dir, device="cpu")
    ims = _images(3, 24, 20, seed=1)
    opts = dict(tile_size=4, tile_overlap=1, tile_batch=3, vae_decoder_tile=3, vae_encoder_tile=40)
    one = [up.process(d, **opts) for d in ims]
    batch = up.process_batch(ims, **opts)
    for (a, ia), (b, ib) in zip(one, batch, strict=True):
        assert abs(a.pixels - b.pixels).max() < TOL
        assert ia["estimated"] == pytest.approx(ib["estimated"], abs=1e-5)
        assert ib["used"] == pytest.approx(ib["estimated"]) and isinstance(ib["estimated"]["blur"], float)
    # the modulation matters at this size: other scores move every image far beyond rounding
    swapped = up.process_batch(ims, blur=0.9, **opts)
    assert all(abs(s.pixels - b.pixels).max() > 1e-3 for (s, _), (b, _) in zip(swapped, batch, strict=True))


def test_batch_arguments(pisa_up):
    ims = _images(2) + _images(1, 12, 9)
    with pytest.raises(ConfigError, match="one size, got 9x10, 9x12"):
        pisa_up.process_batch(ims)
    with pytest.raises(ConfigError, match="do not fit batch_size=1"):
        pisa_up.process_batch(ims[:2], batch_size=1)
    with pytest.raises(ConfigError, match="batch_size=0"):
        pisa_up.process_batch(ims[:1], batch_size=0)
    assert pisa_up.process_batch([]) == []
    one_at_a_time = Upscaler(types.SimpleNamespace(name="patchscaler", scale=4, batchable=False))
    with pytest.raises(ConfigError, match="one image at a time"):
        one_at_a_time.process_batch(ims[:1])


def _folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    sizes = [(10, 12)] * 5 + [(12, 10)] * 2 + [(8, 8)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(src / f"{i:02d}.png")
    (src / "03b.png").write_bytes(b"broken")
    return src, sorted(f"{i:02d}.png" for i in range(len(sizes)))


@pytest.mark.slow
def test_cli_batch_size_groups_by_size_and_resumes_identically(tmp_path, tiny_sd_dir, pisa_dir, capsys):
    src, names = _folder(tmp_path)
    common = ["--base", str(tiny_sd_dir), "--weights", str(pisa_dir), "-q"]
    assert main(["upscale", str(src), "-o", str(tmp_path / "one"), *common]) == 1  # the broken file
    assert main(["upscale", str(src), "-o", str(tmp_path / "b3"), "--batch-size", "3", *common]) == 1
    err = capsys.readouterr().err
    assert "8 written, 0 skipped (exist), 1 failed" in err and "03b.png" in err
    assert sorted(p.name for p in (tmp_path / "b3").iterdir()) == names
    px = {d: {n: np.asarray(Image.open(tmp_path / d / n)).astype(int) for n in names} for d in ("one", "b3")}
    for n in names:  # 8-bit outputs: one level at most, where float rounding crossed a level
        assert np.abs(px["one"][n] - px["b3"][n]).max() <= 1
    # a run stopped half-way and resumed batches the rest differently: the same bits all the same
    for n in names[::2]:
        (tmp_path / "b3" / n).unlink()
    assert main(["upscale", str(src), "-o", str(tmp_path / "b3"), "--batch-size", "3", *common]) == 1
    assert "4 written, 4 skipped (exist), 1 failed" in capsys.readouterr().err
    for n in names:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b3" / n)).astype(int), px["b3"][n]), n


def test_cli_batch_size_is_for_one_step_methods(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    rc = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--method", "patchscaler",
               "--batch-size", "2"])  # fmt: skip
    assert rc == 2 and "--batch-size applies to --method pisa or s3diff" in capsys.readouterr().err
