"""`diffsr.metrics.evaluate` and `diffsr eval`: pairing, reports, unavailable metrics, exit codes.

Learned metrics are mocked with a fake ``pyiqa`` module (fast, deterministic, offline); one
test lets the real pyiqa fail offline for 'lpips'."""

from __future__ import annotations

import csv
import json
import sys
import types
import urllib.error

import numpy as np
import pytest
from PIL import Image

from diffsr.cli import main
from diffsr.errors import ConfigError
from diffsr.metrics import evaluate, pair_folders, parse_metrics, psnr, ssim


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def rand_img(seed, h=32, w=40, c=3):
    rng = np.random.default_rng(seed)
    shape = (h, w, c) if c > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def noisy(arr, seed):
    rng = np.random.default_rng(seed)
    return np.clip(arr.astype(int) + rng.integers(-10, 11, arr.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """pred/gt with nested folders, different extensions, one extra and one missing file."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    arrays = {}
    for i, key in enumerate(["0001", "sub/0002", "sub/deep/0003"]):
        g = rand_img(i)
        p = noisy(g, 100 + i)
        save(gt / f"{key}.png", g)
        save(pred / f"{key}.png", p)
        arrays[key] = (p, g)
    save(pred / "extra.png", rand_img(7))  # no ground truth
    save(gt / "sub" / "missing.bmp", rand_img(8))  # no prediction
    return pred, gt, arrays


class FakeMetric:
    """Stands in for a pyiqa InferenceModel: deterministic, checks the input contract."""

    def __init__(self, name, lower_better, mode):
        self.name, self.lower_better, self.metric_mode = name, lower_better, mode
        self.calls = 0

    def __call__(self, x, y=None, **kwargs):
        import torch

        self.calls += 1
        if self.name == "fid":
            assert isinstance(x, str) and isinstance(y, str)
            return 12.5
        assert isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[:2] == (1, 3)
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        if self.metric_mode == "FR":
            assert y is not None and y.shape == x.shape
            return torch.tensor([float((x - y).abs().mean())])
        return torch.tensor([[float(x.mean())]])


def fake_pyiqa(monkeypatch, fail=None):
    """Install a fake `pyiqa`; `fail` maps metric name -> exception raised by create_metric."""
    fail = fail or {}
    mod = types.ModuleType("pyiqa")
    created = {}

    def create_metric(name, as_loss=False, device=None, **kw):
        assert as_loss is False
        if name in fail:
            raise fail[name]
        lower = name in ("lpips", "lpips-vgg", "dists", "fid", "niqe")
        mode = "FR" if name in ("lpips", "lpips-vgg", "dists") else "NR"
        created[name] = FakeMetric(name, lower, mode)
        return created[name]

    mod.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", mod)
    return created


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------ pairing


def test_pairing_nested_and_extensions(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "sub" / "0001.png", rand_img(0))
    save(gt / "sub" / "0001.jpg", rand_img(0))
    save(pred / "a.webp", rand_img(1))
    save(gt / "a.tif", rand_img(1))
    save(pred / "b.png", rand_img(2))  # sorted-order neighbours, different names: never paired
    save(gt / "c.png", rand_img(2))
    p = pair_folders(pred, gt)
    assert [(k, a.name, b.name) for k, a, b in p.pairs] == [
        ("a", "a.webp", "a.tif"),
        ("sub/0001", "0001.png", "0001.jpg"),
    ]
    assert p.unmatched == {"pred": ["b.png"], "gt": ["c.png"]}


def test_no_flat_fallback(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "x" / "0001.png", rand_img(0))
    save(gt / "0001.png", rand_img(0))
    p = pair_folders(pred, gt)
    assert p.pairs == [] and p.unmatched == {"pred": ["x/0001.png"], "gt": ["0001.png"]}
    assert p.notes and "ignored" in p.notes[0]


def test_ambiguous_key_fails(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "a.png", rand_img(0))
    save(pred / "a.jpg", rand_img(0))
    save(gt / "a.png", rand_img(0))
    r = evaluate(pred, gt, "psnr")
    assert r.count == 0 and "a" in r.failed and "a.png" in r.failed["a"] and "a.jpg" in r.failed["a"]
    assert r.unmatched == {"pred": [], "gt": []}


# ------------------------------------------------------------------ evaluate / reports


def test_psnr_ssim_report(folders, tmp_path):
    pred, gt, arrays = folders
    r = evaluate(pred, gt, "psnr,ssim", crop_border=4)
    assert [k for k, _ in r.rows] == ["0001", "sub/0002", "sub/deep/0003"]
    for key, values in r.rows:
        p, g = (a.astype(np.float64) for a in arrays[key])
        assert values["psnr"] == pytest.approx(psnr(p, g, 4), abs=1e-12)
        assert values["ssim"] == pytest.approx(ssim(p, g, 4), abs=1e-12)
    assert r.unmatched == {"pred": ["extra.png"], "gt": ["sub/missing.bmp"]}
    assert r.failed == {} and r.unavailable == {}

    out = tmp_path / "report"
    r.write(out)
    rows = read_csv(out / "metrics.csv")
    assert rows[0] == ["image", "psnr", "ssim"]
    assert [row[0] for row in rows[1:]] == ["0001", "sub/0002", "sub/deep/0003", "mean"]
    body = np.array([[float(c) for c in row[1:]] for row in rows[1:-1]])
    mean_row = [float(c) for c in rows[-1][1:]]
    np.testing.assert_allclose(mean_row, body.mean(axis=0), rtol=1e-12)

    s = json.loads((out / "summary.json").read_text())
    assert s["count"] == 3
    assert s["mean"]["psnr"] == pytest.approx(mean_row[0]) and s["mean"]["ssim"] == pytest.approx(mean_row[1])
    assert s["unmatched"] == {"pred": ["extra.png"], "gt": ["sub/missing.bmp"]}
    assert s["failed"] == {} and s["unavailable"] == {}
    st = s["settings"]
    assert st["crop_border"] == 4 and st["color_space"] == "y" and st["test_y_channel"] is True
    assert st["lpips_variant"] is None and st["device"] == "cpu"
    assert {"diffsr", "numpy", "torch", "python"} <= set(s["versions"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    md = r.markdown()
    assert md.splitlines()[0] == "| metric | value | images |"
    n = s["counts"]["psnr"]
    assert n == r.count and s["counts"]["ssim"] == n
    assert f"| psnr (basicsr: Y, crop 4) ↑ | {s['mean']['psnr']:.2f} | {n} |" in md
    assert f"| ssim (basicsr: Y, crop 4) ↑ | {s['mean']['ssim']:.4f} | {n} |" in md


def test_rgb_and_crop_settings(folders):
    pred, gt, arrays = folders
    r = evaluate(pred, gt, ["psnr", "ssim"], crop_border=0, color_space="rgb")
    p, g = (a.astype(np.float64) for a in arrays["0001"])
    assert r.rows[0][1]["psnr"] == pytest.approx(psnr(p, g, 0, test_y_channel=False), abs=1e-12)
    assert r.rows[0][1]["ssim"] == pytest.approx(ssim(p, g, 0, test_y_channel=False), abs=1e-12)
    assert r.settings["test_y_channel"] is False


def test_identical_gives_inf_and_strict_json(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "a.png", rand_img(0))
    save(gt / "a.png", rand_img(0))
    r = evaluate(pred, gt, "psnr,ssim")
    r.write(tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["mean"]["psnr"] == "inf" and s["mean"]["ssim"] == pytest.approx(1.0)
    assert "| psnr (basicsr: Y, crop 4) ↑ | inf | 1 |" in r.markdown()


def test_size_and_channel_mismatch(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "ok.png", rand_img(0))
    save(gt / "ok.png", rand_img(1))
    save(pred / "small.png", rand_img(2, 16, 20))
    save(gt / "small.png", rand_img(2, 64, 80))
    save(pred / "gray.png", rand_img(3, c=1))
    save(gt / "gray.png", rand_img(3))
    save(pred / "odd.png", rand_img(4, 16, 20))
    save(gt / "odd.png", np.pad(rand_img(4, 16, 20), ((0, 3), (0, 2), (0, 0))))  # HR not a multiple of 4
    r = evaluate(pred, gt, "psnr")
    assert [k for k, _ in r.rows] == ["gray", "ok"]  # gray vs RGB: compared as RGB (the stated rule)
    msg = r.failed["small"]
    assert "size mismatch" in msg and str(pred / "small.png") in msg and str(gt / "small.png") in msg
    assert "20x16" in msg and "80x64" in msg
    assert "crop_to_scale=SCALE" in r.failed["odd"]
    # with crop-to-scale the 19x22 ground truth is cropped to the 16x20 prediction, top-left: identical
    r = evaluate(pred, gt, "psnr", crop_to_scale=4)
    assert dict(r.rows)["odd"]["psnr"] == float("inf") and "small" in r.failed
    rgb = rand_img(3)
    gray_as_rgb = np.repeat(rand_img(3, c=1)[..., None], 3, axis=-1)
    from diffsr.metrics.psnr_ssim import psnr as bpsnr

    want = bpsnr(np.rint(gray_as_rgb.astype(np.float64)), np.rint(rgb.astype(np.float64)), crop_border=4,
                 test_y_channel=True)  # fmt: skip
    assert dict(r.rows)["gray"]["psnr"] == pytest.approx(want, rel=1e-9)


def test_grayscale_pairs(tmp_path):
    pred, gt = tmp_path / "p", tmp_path / "g"
    g = rand_img(0, c=1)
    p = noisy(g, 1)
    save(pred / "a.png", p)
    save(gt / "a.png", g)
    r = evaluate(pred, gt, "psnr,ssim")
    assert r.rows[0][1]["psnr"] == pytest.approx(psnr(p.astype(float), g.astype(float), 4), abs=1e-12)


def test_argument_errors(folders):
    pred, gt, _ = folders
    with pytest.raises(ConfigError, match=r"psnr, lpips need\(s\) a ground-truth folder \(gt_dir\)"):
        evaluate(pred, None, "psnr,lpips")  # the API names its argument, the CLI its flag (test_cli_robust)
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(pred, gt, "psnr,bogus")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(pred / "nope", gt, "psnr")
    with pytest.raises(ConfigError, match="color_space"):
        evaluate(pred, gt, "psnr", color_space="lab")


# ------------------------------------------------------------------ learned metrics (mocked)


def test_mocked_metrics_land_in_their_cells(folders, monkeypatch, tmp_path):
    pred, gt, arrays = folders
    created = fake_pyiqa(monkeypatch)
    r = evaluate(pred, gt, "lpips,psnr,musiq,fid", device="cpu")
    assert r.unavailable == {}
    assert created["lpips"].calls == 3 and created["musiq"].calls == 3 and created["fid"].calls == 1
    for key, values in r.rows:
        p, g = (a.astype(np.float64) / 255.0 for a in arrays[key])
        assert values["lpips"] == pytest.approx(np.abs(p - g).mean(), abs=1e-6)
        assert values["musiq"] == pytest.approx(p.mean(), abs=1e-6)
        assert "fid" not in values
    assert r.lower_better == {"lpips": True, "psnr": False, "musiq": False, "fid": True}
    r.write(tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert rows[0] == ["image", "lpips", "psnr", "musiq", "fid"]
    for row in rows[1:-1]:
        assert row[4] == ""  # set-level metric: no per-image value
        values = dict(r.rows)[row[0]]
        assert float(row[1]) == values["lpips"] and float(row[3]) == values["musiq"]
    assert rows[-1][0] == "mean" and float(rows[-1][4]) == 12.5
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["mean"]["fid"] == 12.5
    assert s["settings"]["lpips_variant"] == {"lpips": "alex"}
    assert s["settings"]["pyiqa_metric_names"] == {"lpips": "lpips", "musiq": "musiq", "fid": "fid"}
    md = r.markdown()
    assert "| lpips ↓ |" in md and "| musiq ↑ |" in md and "| fid ↓ | 12.5000 |" in md


def test_no_reference_without_gt(folders, monkeypatch, tmp_path, capsys):
    pred, _, arrays = folders
    fake_pyiqa(monkeypatch)
    assert parse_metrics(None, has_gt=False) == ["niqe", "musiq", "maniqa", "clipiqa"]
    r = evaluate(pred, None, "musiq,maniqa,clipiqa", device="cpu")  # niqe: see test_niqe.py
    assert [k for k, _ in r.rows] == ["0001", "extra", "sub/0002", "sub/deep/0003"]
    assert r.rows[0][1]["musiq"] == pytest.approx(arrays["0001"][0].mean() / 255.0, abs=1e-6)
    assert r.unmatched == {"pred": [], "gt": []}

    rc = main(["eval", "--pred", str(pred), "-q", "--metrics", "musiq,clipiqa", "-o", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| musiq ↑ |" in out and "| clipiqa ↑ |" in out
    assert read_csv(tmp_path / "o" / "metrics.csv")[0] == ["image", "musiq", "clipiqa"]


def test_unavailable_metric_offline_mocked(folders, monkeypatch, tmp_path, capsys):
    from huggingface_hub.errors import LocalEntryNotFoundError

    pred, gt, _ = folders
    fake_pyiqa(
        monkeypatch,
        fail={
            "lpips": urllib.error.URLError("[Errno -2] Name or service not known"),
            "maniqa": LocalEntryNotFoundError("cannot find the requested files in the local cache"),
        },
    )
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "-q", "--metrics", "psnr,lpips,maniqa,ssim",
               "-o", str(tmp_path / "o")])  # fmt: skip
    assert rc == 1  # the files are fine, but two requested columns are missing
    err = capsys.readouterr().err
    assert "lpips: unavailable: URLError" in err and "maniqa: unavailable: LocalEntryNotFoundError" in err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert set(s["unavailable"]) == {"lpips", "maniqa"} and "URLError" in s["unavailable"]["lpips"]
    assert s["mean"]["lpips"] is None and isinstance(s["mean"]["psnr"], float)
    rows = read_csv(tmp_path / "o" / "metrics.csv")
    assert rows[0] == ["image", "psnr", "lpips", "maniqa", "ssim"]
    assert all(row[2] == "" and row[3] == "" and row[1] and row[4] for row in rows[1:])


def test_every_metric_unavailable_exits_1(folders, monkeypatch):
    pred, gt, _ = folders
    fake_pyiqa(monkeypatch, fail={"lpips": OSError("offline"), "dists": OSError("offline")})
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "-q", "--metrics", "lpips,dists"]) == 1


def test_lazy_weights_failure_on_first_call(folders, monkeypatch):
    pred, gt, _ = folders
    created = fake_pyiqa(monkeypatch)

    def boom(*a, **k):
        raise OSError("weights download failed")

    r0 = evaluate(pred, gt, "psnr,musiq", device="cpu")
    assert r0.unavailable == {}
    created["musiq"].__class__ = type("Lazy", (FakeMetric,), {"__call__": boom})
    fake = sys.modules["pyiqa"]
    orig = fake.create_metric
    fake.create_metric = lambda name, **kw: created[name] if name == "musiq" else orig(name, **kw)
    r = evaluate(pred, gt, "psnr,musiq", device="cpu")
    assert "musiq" in r.unavailable and "weights download failed" in r.unavailable["musiq"]
    assert r.count == 3 and r.failed == {} and all("musiq" not in v for _, v in r.rows)


def test_metric_error_on_one_image_fails_that_pair(folders, monkeypatch):
    pred, gt, _ = folders
    created = fake_pyiqa(monkeypatch)
    fake = sys.modules["pyiqa"]
    orig = fake.create_metric

    class Picky(FakeMetric):
        def __call__(self, x, y=None, **kw):
            if x.shape[-1] == 40 and self.calls == 1:
                self.calls += 1
                raise ValueError("image too small")
            return super().__call__(x, y)

    def create(name, **kw):
        m = orig(name, **kw)
        m.__class__ = Picky
        return m

    fake.create_metric = create
    r = evaluate(pred, gt, "psnr,musiq", device="cpu")
    assert r.count == 2 and list(r.failed) == ["sub/0002"]
    assert "musiq" in r.failed["sub/0002"] and "image too small" in r.failed["sub/0002"]
    assert created["musiq"].calls == 3


def test_pyiqa_not_installed(folders, monkeypatch):
    pred, gt, _ = folders
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    r = evaluate(pred, gt, "psnr,lpips,clipiqa", device="cpu")
    assert set(r.unavailable) == {"lpips", "clipiqa"}
    assert all("pip install diffsr[metrics]" in v for v in r.unavailable.values())
    assert r.count == 3 and all("psnr" in v for _, v in r.rows)


def test_real_pyiqa_offline_lpips(folders, monkeypatch, tmp_path):
    """The real pyiqa, offline: 'lpips' cannot fetch its AlexNet weights and is reported."""
    pytest.importorskip("pyiqa")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights
    pred, gt, _ = folders
    r = evaluate(pred, gt, "psnr,ssim,lpips", device="cpu")
    assert "lpips" in r.unavailable and r.count == 3
    assert all({"psnr", "ssim"} == set(v) for _, v in r.rows)


# ------------------------------------------------------------------ CLI


def test_cli_ok_and_outputs(folders, tmp_path, capsys):
    pred, gt, _ = folders
    out = tmp_path / "rep"
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim", "--scale", "2", "-q",
               "-o", str(out)])  # fmt: skip
    assert rc == 0
    cap = capsys.readouterr()
    assert "| psnr (basicsr: Y, crop 2) ↑ |" in cap.out and "| ssim (basicsr: Y, crop 2) ↑ |" in cap.out
    assert "extra.png" in cap.err and "sub/missing.bmp" in cap.err
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["crop_border"] == 2 and s["settings"]["scale"] == 2
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr", "--crop-border", "0", "-q"])
    assert rc == 0


def test_cli_failed_pair_exit_1(tmp_path, capsys):
    pred, gt = tmp_path / "p", tmp_path / "g"
    save(pred / "a.png", rand_img(0))
    save(gt / "a.png", rand_img(1))
    save(pred / "b.png", rand_img(2, 16, 20))
    save(gt / "b.png", rand_img(2))
    rc = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim", "-q"])
    assert rc == 1
    cap = capsys.readouterr()
    assert "| psnr (basicsr: Y, crop 4) ↑ |" in cap.out
    assert "size mismatch" in cap.err and str(pred / "b.png") in cap.err and str(gt / "b.png") in cap.err


@pytest.mark.parametrize(
    "argv",
    [
        ["--pred", "{tmp}/does-not-exist", "--metrics", "niqe"],
        ["--pred", "{pred}", "--metrics", "psnr,lpips"],  # full-reference metrics without --gt
        ["--pred", "{pred}", "--gt", "{gt}", "--metrics", "psnr,nope"],
        ["--pred", "{pred}", "--gt", "{gt}", "--crop-border", "-1"],
        ["--gt", "{gt}"],
    ],
)
def test_cli_bad_arguments_exit_2(folders, tmp_path, argv, capsys):
    pred, gt, _ = folders
    argv = [a.format(tmp=tmp_path, pred=pred, gt=gt) for a in argv]
    try:
        rc = main(["eval", "-q", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.strip()
    if "psnr,lpips" in argv:
        assert "psnr" in err and "lpips" in err and "--gt" in err


def test_cli_nothing_to_evaluate_exit_1(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    assert (
        main(["eval", "--pred", str(tmp_path / "p"), "--gt", str(tmp_path / "g"), "--metrics", "psnr", "-q"])
        == 1
    )


def test_pyiqa_convention_matches_its_definition(tmp_path, capsys):
    """--convention pyiqa: PSNR on the (unrounded) Y of YCbCr in [0, 1], no crop; the table says so."""
    pytest.importorskip("pyiqa")
    pred, gt = tmp_path / "p", tmp_path / "g"
    a, b = rand_img(10), rand_img(11)
    save(pred / "x.png", a)
    save(gt / "x.png", b)
    r = evaluate(pred, gt, "psnr,ssim", convention="pyiqa")

    def y(img):
        f = img.astype(np.float64) / 255
        return (16 + 65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255

    want = 10 * np.log10(1 / (np.mean((y(a) - y(b)) ** 2) + 1e-8))
    got = dict(r.rows)["x"]
    assert got["psnr"] == pytest.approx(want, abs=1e-3)
    basic = dict(evaluate(pred, gt, "psnr,ssim").rows)["x"]
    assert got["psnr"] != pytest.approx(basic["psnr"], abs=1e-3)  # the crop makes them differ
    assert 0 < got["ssim"] < 1 and r.settings["convention"] == "pyiqa"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr", "--convention", "pyiqa",
                 "-q"]) == 0  # fmt: skip
    assert "| psnr (pyiqa: Y of YCbCr, no crop) ↑ |" in capsys.readouterr().out


def test_maniqa_variant_is_named(folders, monkeypatch, capsys):
    """MANIQA has one model per training set; the table and summary say which one ran."""
    pred, gt, _ = folders
    fake_pyiqa(monkeypatch)
    cfgs = types.ModuleType("pyiqa.default_model_configs")
    cfgs.DEFAULT_CONFIGS = {"maniqa": {"metric_opts": {"train_dataset": "koniq"}},
                            "maniqa-pipal": {"metric_opts": {"train_dataset": "pipal"}}}  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyiqa.default_model_configs", cfgs)
    r = evaluate(pred, gt, "maniqa,maniqa-pipal", device="cpu")
    assert r.settings["pyiqa_training_sets"] == {"maniqa": "koniq", "maniqa-pipal": "pipal"}
    md = r.markdown()
    assert "| maniqa (koniq) ↑ |" in md and "| maniqa-pipal (pipal) ↑ |" in md
    monkeypatch.undo()  # the installed pyiqa's own table, when there is one
    pytest.importorskip("pyiqa.default_model_configs")
    from diffsr.metrics.evaluate import _training_sets

    assert _training_sets(["maniqa-pipal", "maniqa-kadid"]) == {
        "maniqa-pipal": "pipal",
        "maniqa-kadid": "kadid",
    }
