"""HQImageDataset: sources, crops, padding, min_size, flips, reproducibility, captions, bad files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.errors import ConfigError
from diffsr.train.data import HQImageDataset, resolve_sources


def _write(path, h, w, *, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return arr


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _write(root / "a.png", 80, 96, seed=1)
    _write(root / "sub" / "b.png", 72, 70, seed=2)
    _write(root / ".hidden.png", 80, 80, seed=3)
    (root / "notes.md").write_text("not an image")
    (root / "a.txt").write_text("  a red barn, photo \n", encoding="utf-8")
    return root


def test_folder_and_list_sources(folder, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    c = _write(tmp_path / "other" / "c.jpg", 64, 64, seed=4)
    del c
    (lists / "train.txt").write_text(
        "# training list\n\n../other/c.jpg\n   \n# ../imgs/a.png is commented out\n"
        f"{(folder / 'a.png').as_posix()}\n",
        encoding="utf-8",
    )
    paths = resolve_sources([folder, lists / "train.txt"])
    names = [p.name for p in paths]
    assert names == ["a.png", "b.png", "c.jpg", "a.png"]  # folder sorted, hidden/non-image skipped
    ds = HQImageDataset([str(folder), lists / "train.txt"], crop_size=32)
    assert len(ds) == 4
    assert ds[2]["path"].endswith("c.jpg")
    # a single source may be given bare
    assert len(HQImageDataset(folder, crop_size=32)) == 2


def test_crop_shape_range_and_collate(folder):
    ds = HQImageDataset(folder, crop_size=48, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        hr = item["hr"]
        assert hr.shape == (3, 48, 48) and hr.dtype == torch.float32
        assert 0.0 <= hr.min() and hr.max() <= 1.0
        assert hr.is_contiguous()
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)))
    assert batch["hr"].shape == (2, 3, 48, 48)
    assert batch["caption"] == ["a red barn, photo", ""]
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert torch.equal(ds[-1]["hr"], ds[len(ds) - 1]["hr"])


def test_crop_content_is_a_window_of_the_image(tmp_path):
    arr = _write(tmp_path / "x.png", 40, 50, seed=5)
    ds = HQImageDataset(tmp_path, crop_size=16, hflip=False, seed=9)
    hr = (ds[0]["hr"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    hits = [
        (y, x)
        for y in range(40 - 15)
        for x in range(50 - 15)
        if np.array_equal(arr[y : y + 16, x : x + 16], hr)
    ]
    assert len(hits) == 1


def test_small_images_are_reflect_padded(tmp_path):
    arr = _write(tmp_path / "small.png", 60, 100, seed=6)  # H=60, W=100 < crop 128
    _write(tmp_path / "tiny.png", 3, 5, seed=7)  # far below half the crop: repeated reflection
    ds = HQImageDataset(tmp_path, crop_size=128, hflip=False)
    by_name = {ds[i]["path"].rsplit("/", 1)[-1]: ds[i]["hr"] for i in range(len(ds))}
    hr = by_name["small.png"]
    assert hr.shape == (3, 128, 128)
    expected = np.pad(arr, ((34, 34), (14, 14), (0, 0)), mode="reflect").astype(np.float32) / 255
    np.testing.assert_allclose(hr.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert by_name["tiny.png"].shape == (3, 128, 128)


def test_min_size_skips_small_images_with_one_warning(tmp_path):
    _write(tmp_path / "a_small.png", 30, 200, seed=1)
    _write(tmp_path / "b_big.png", 80, 90, seed=2)
    ds = HQImageDataset(tmp_path, crop_size=32, min_size=64)
    with pytest.warns(RuntimeWarning, match=r"a_small\.png.*min_size=64"):
        item = ds[0]
    assert item["path"].endswith("b_big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert ds[0]["path"].endswith("b_big.png")
        assert ds[1]["path"].endswith("b_big.png")
    # without min_size the small image is padded instead
    assert HQImageDataset(tmp_path, crop_size=32)[0]["path"].endswith("a_small.png")


def test_hflip_flips(tmp_path):
    _write(tmp_path / "img" / "x.png", 50, 60, seed=8)
    (tmp_path / "list.txt").write_text("img/x.png\n" * 16)
    on = HQImageDataset(tmp_path / "list.txt", crop_size=32, hflip=True, seed=5)
    off = HQImageDataset(tmp_path / "list.txt", crop_size=32, hflip=False, seed=5)
    flipped = 0
    for i in range(16):
        a, b = on[i]["hr"], off[i]["hr"]
        if torch.equal(a, b):
            continue
        assert torch.equal(a, b.flip(-1))
        flipped += 1
    assert 0 < flipped < 16


def test_reproducible_per_seed_epoch_index(folder):
    d1 = HQImageDataset(folder, crop_size=24, seed=11)
    d2 = HQImageDataset(folder, crop_size=24, seed=11)
    e0 = [d1[i]["hr"] for i in range(len(d1))]
    # order of access does not matter, and a fresh dataset gives the same items
    for i in reversed(range(len(d2))):
        assert torch.equal(d2[i]["hr"], e0[i])
    d1.set_epoch(1)
    e1 = [d1[i]["hr"] for i in range(len(d1))]
    assert any(not torch.equal(a, b) for a, b in zip(e0, e1, strict=True))
    d2.set_epoch(1)
    assert all(torch.equal(d2[i]["hr"], e1[i]) for i in range(len(d2)))
    d1.set_epoch(0)
    assert all(torch.equal(d1[i]["hr"], e0[i]) for i in range(len(d1)))
    other = HQImageDataset(folder, crop_size=24, seed=12)
    assert any(not torch.equal(other[i]["hr"], e0[i]) for i in range(len(other)))
    with pytest.raises(ConfigError):
        d1.set_epoch(-1)


def test_no_global_rng_use(folder):
    ds = HQImageDataset(folder, crop_size=24)
    torch.manual_seed(0)
    np.random.seed(0)
    state_t, state_n = torch.get_rng_state(), np.random.get_state()[1].copy()
    ds[0], ds[1]
    assert torch.equal(torch.get_rng_state(), state_t)
    assert np.array_equal(np.random.get_state()[1], state_n)


def test_captions(folder):
    ds = HQImageDataset(folder, crop_size=16)
    assert ds[0]["caption"] == "a red barn, photo"
    assert ds[1]["caption"] == ""
    assert HQImageDataset(folder, crop_size=16, captions=False)[0]["caption"] == ""


def test_grayscale_becomes_rgb(tmp_path):
    _write(tmp_path / "g.png", 40, 40, mode="L")
    hr = HQImageDataset(tmp_path, crop_size=32)[0]["hr"]
    assert hr.shape == (3, 32, 32)
    assert torch.equal(hr[0], hr[1]) and torch.equal(hr[1], hr[2])


def test_unreadable_image_is_skipped_once(tmp_path):
    _write(tmp_path / "a.png", 40, 40, seed=1)
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    _write(tmp_path / "c.png", 40, 40, seed=3)
    ds = HQImageDataset(tmp_path, crop_size=32)
    with pytest.warns(RuntimeWarning, match=r"b\.png.*unreadable"):
        item = ds[1]
    assert item["path"].endswith("c.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1]["path"].endswith("c.png")
    # crops stay keyed by the requested index
    assert ds[1]["hr"].shape == (3, 32, 32)


def test_unreadable_last_image_wraps(tmp_path):
    _write(tmp_path / "a.png", 40, 40, seed=1)
    (tmp_path / "z.png").write_bytes(b"garbage")
    ds = HQImageDataset(tmp_path, crop_size=32)
    with pytest.warns(RuntimeWarning):
        assert ds[1]["path"].endswith("a.png")


def test_no_usable_image_raises(tmp_path):
    (tmp_path / "b.png").write_bytes(b"garbage")
    ds = HQImageDataset(tmp_path, crop_size=32)
    with pytest.warns(RuntimeWarning), pytest.raises(ConfigError, match="none of the 1"):
        ds[0]


def test_source_errors(tmp_path, folder):
    with pytest.raises(ConfigError, match="missing_dir"):
        HQImageDataset(tmp_path / "missing_dir")
    with pytest.raises(ConfigError, match="nolist.txt"):
        HQImageDataset([folder, tmp_path / "nolist.txt"])
    (tmp_path / "bad_list.txt").write_text("# header\nimgs/a.png\nimgs/nope.png\n")
    with pytest.raises(ConfigError, match=r"bad_list\.txt:3.*nope\.png"):
        HQImageDataset(tmp_path / "bad_list.txt")
    (tmp_path / "blob.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]) * 8)
    with pytest.raises(ConfigError, match="blob.bin"):
        HQImageDataset(tmp_path / "blob.bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no training images"):
        HQImageDataset(empty)
    (tmp_path / "empty_list.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="no training images"):
        HQImageDataset(tmp_path / "empty_list.txt")
    with pytest.raises(ConfigError):
        HQImageDataset(folder, crop_size=0)
    with pytest.raises(ConfigError):
        HQImageDataset(folder, min_size=-3)
