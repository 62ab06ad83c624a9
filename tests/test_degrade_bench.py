"""`diffsr degrade` pair sets (reproducible bytes) and `diffsr bench` JSON on tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffsr.cli import main
from diffsr.pairs import image_seed


@pytest.fixture
def hr_dir(tmp_path):
    d = tmp_path / "hr_in"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((70, 66, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(d / "sub" / "b.jpg")
    (d / "sub" / "bad.png").write_text("not an image")
    return d


@pytest.mark.parametrize("preset", ["pisa", "s3diff", "bicubic"])
def test_degrade_layout_and_byte_identical(hr_dir, tmp_path, preset, capsys):
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert (
        main(["degrade", str(hr_dir), "-o", str(out1), "--preset", preset, "--seed", "3", "-q"]) == 1
    )  # bad.png
    assert "bad.png" in capsys.readouterr().err
    assert main(["degrade", str(hr_dir), "-o", str(out2), "--preset", preset, "--seed", "3", "-q"]) == 1
    for key, (h, w) in {"a": (68, 64), "sub/b": (40, 48)}.items():
        hr1, lr1 = out1 / "hr" / f"{key}.png", out1 / "lr" / f"{key}.png"
        assert Image.open(hr1).size == (w, h) and Image.open(lr1).size == (w // 4, h // 4)
        assert hr1.read_bytes() == (out2 / "hr" / f"{key}.png").read_bytes()
        assert lr1.read_bytes() == (out2 / "lr" / f"{key}.png").read_bytes()
    lines = [json.loads(x) for x in (out1 / "params.jsonl").read_text().splitlines()]
    assert [x["image"] for x in lines] == ["a", "sub/b"]
    assert lines[0]["preset"] == preset and lines[0]["seed"] == image_seed(
        3, __import__("pathlib").PurePath("a")
    )
    if preset != "bicubic":
        assert {"kernel1", "noise1", "jpeg1", "jpeg2"} <= set(lines[0]["params"])
    assert (out1 / "params.jsonl").read_bytes() == (out2 / "params.jsonl").read_bytes()


def test_degrade_other_seed_differs(hr_dir, tmp_path):
    main(["degrade", str(hr_dir / "a.png"), "-o", str(tmp_path / "s0"), "--seed", "0", "-q"])
    main(["degrade", str(hr_dir / "a.png"), "-o", str(tmp_path / "s1"), "--seed", "1", "-q"])
    assert (tmp_path / "s0/lr/a.png").read_bytes() != (tmp_path / "s1/lr/a.png").read_bytes()


def test_bicubic_preset_is_pillow_bicubic(hr_dir, tmp_path):
    main(["degrade", str(hr_dir / "a.png"), "-o", str(tmp_path / "b"), "--preset", "bicubic", "-q"])
    hr = Image.open(tmp_path / "b/hr/a.png")
    ref = np.asarray(hr.resize((16, 17), Image.Resampling.BICUBIC)).astype(int)
    got = np.asarray(Image.open(tmp_path / "b/lr/a.png")).astype(int)
    assert np.abs(got - ref).max() <= 1


def test_bench_json_fields(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--method", "pisa", "s3diff", "--size", "tiny", "--input", "16", "--warmup", "0",
                 "--repeats", "2", "--device", "cpu", "--json", str(out)]) == 0  # fmt: skip
    d = json.loads(out.read_text())
    env = d["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and "torch" in env and "diffusers" in env
    assert len(env["load_average_1_5_15"]) == 3 and all(x >= 0 for x in env["load_average_1_5_15"])
    assert env["commit"] is None or len(env["commit"].split("+")[0]) == 40  # this checkout's commit
    runs = {r["method"]: r for r in d["runs"]}
    assert set(runs) == {"pisa", "s3diff"} and runs["pisa"]["output"] == 64
    # one process per method: no model's freed memory counts in another's peak
    assert len({r["pid"] for r in runs.values()} | {os.getpid()}) == 3
    names = [c["name"] for c in runs["pisa"]["cases"]]
    assert names == ["default (λ=1,1, merged)", "adjustable (λ=0.5,0.8, batched)", "re-render (decode only)"]
    for case in runs["pisa"]["cases"] + runs["s3diff"]["cases"]:
        assert len(case["seconds"]) == 2 and case["min"] <= case["median"] <= case["max"]
        assert len(case["cpu_seconds"]) == 2 and all(c > 0 for c in case["cpu_seconds"])
        assert case["peak_bytes"] > 0 and case["peak_kind"] in ("rss_peak", "rss_peak_since_start")
    assert "cpu s" in capsys.readouterr().out


def test_degrade_upscale_eval_end_to_end(hr_dir, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    pairs = tmp_path / "pairs"
    main(["degrade", str(hr_dir / "a.png"), str(hr_dir / "sub" / "b.jpg"), "-o", str(pairs), "--preset", "bicubic",
          "-q"])  # fmt: skip
    assert main(["upscale", str(pairs / "lr"), "-o", str(tmp_path / "sr"), "--base", str(tiny_sd_dir), "--weights",
                 str(pisa_dir), "-q"]) == 0  # fmt: skip
    report = tmp_path / "report"
    assert main(["eval", "--pred", str(tmp_path / "sr"), "--gt", str(pairs / "hr"), "--metrics", "psnr,ssim", "-o",
                 str(report), "-q"]) == 0  # fmt: skip
    summary = json.loads((report / "summary.json").read_text())
    assert summary["count"] == 2 and set(summary["mean"]) == {"psnr", "ssim"}
    assert "| psnr (basicsr: Y, crop 4) ↑ |" in capsys.readouterr().out
