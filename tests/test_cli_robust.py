"""`diffsr upscale` at the edges: --suffix next to the inputs, predicted output names, devices checked
before loading, SIGTERM, long names; PatchScaler's device map, unified mode, seeds and progress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.cli import main
from diffsr.errors import DiffSRError


def run(args, tiny_sd_dir, pisa_dir):
    return main(["upscale", *map(str, args), "--base", str(tiny_sd_dir), "--weights", str(pisa_dir), "-q"])


def _img(path, size=(12, 10), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray((rng.random((size[1], size[0], c)) * 255).astype(np.uint8), mode).save(path)


def test_suffix_writes_next_to_inputs_and_reruns_do_not_reread_outputs(
    tmp_path, tiny_sd_dir, pisa_dir, capsys
):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.jpg", seed=1)
    before = (tmp_path / "a.png").read_bytes()
    # -o on the input folder without a suffix: a.png would be replaced → refused, input untouched
    assert run([tmp_path, "-o", tmp_path], tiny_sd_dir, pisa_dir) == 1
    assert "a.png: the output would replace an input (use --suffix" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == before
    (tmp_path / "b.png").unlink()  # b.jpg → b.png was written
    assert run([tmp_path, "-o", tmp_path, "--suffix", "_sr"], tiny_sd_dir, pisa_dir) == 0
    assert Image.open(tmp_path / "a_sr.png").size == (48, 40) and (tmp_path / "b_sr.png").is_file()
    assert "2 written" in capsys.readouterr().err
    assert (
        run([tmp_path, "-o", tmp_path, "--suffix", "_sr"], tiny_sd_dir, pisa_dir) == 0
    )  # again: nothing new
    assert "all 2 outputs exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("*_sr_sr*"))
    assert main(["upscale", str(tmp_path), "-o", str(tmp_path / "x"), "--suffix", "a/b"]) == 2


def test_skip_existing_predicts_png_for_alpha_with_ext_jpg(tmp_path, tiny_sd_dir, pisa_dir, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "rgba.png", mode="RGBA")
    _img(src / "rgb.png")
    out = tmp_path / "out"
    assert run([src, "-o", out, "--ext", "jpg"], tiny_sd_dir, pisa_dir) == 0
    assert sorted(p.name for p in out.iterdir()) == ["rgb.jpg", "rgba.png"]
    capsys.readouterr()
    assert (
        run([src, "-o", out, "--ext", "jpg"], tiny_sd_dir, pisa_dir) == 0
    )  # nothing recomputed, no "exists"
    assert "all 2 outputs exist" in capsys.readouterr().err


def test_unavailable_devices_are_refused_before_loading(tmp_path, capsys):
    _img(tmp_path / "a.png")
    t0 = time.perf_counter()
    rc = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--method", "patchscaler",
               "--weights", "/nonexistent", "--group-devices", "hard=cuda:7"])  # fmt: skip
    err = capsys.readouterr().err
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert rc == 2 and "cuda:7" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 5  # refused before any weights were looked for
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--device", "tpu:0"]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_sigterm_stops_like_ctrl_c_without_temporary_files(tmp_path, tiny_sd_dir, pisa_dir):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        _img(src / f"{i:02d}.png", size=(48, 48), seed=i)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "diffsr", "upscale", str(src), "-o", str(out), "--base",
                          str(tiny_sd_dir), "--weights", str(pisa_dir), "-q"], env=env, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(out.glob("*.png"))):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    written = list(out.glob("*.png"))
    assert 1 <= len(written) < 40
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left
    for f in written:
        assert Image.open(f).size == (192, 192)  # every file there is complete


def test_longest_legal_output_name_is_written(tmp_path):
    from diffsr.io import ImageData, write_image

    name = "é" * 125 + ".png"  # 254 bytes: legal; its temporary name must be too
    assert len(name.encode()) == 254
    write_image(tmp_path / name, ImageData(np.zeros((4, 4, 3), np.float32), None, 8))
    assert [p.name for p in tmp_path.iterdir()] == [name]


# ---------------------------------------------------------------- PatchScaler
@pytest.fixture
def ps():
    from dataclasses import asdict

    from diffsr.methods.patchscaler.dit import PRESETS
    from diffsr.methods.patchscaler.model import PatchScaler, PatchScalerConfig, random_nets
    from diffsr.synthetic import random_sd_parts

    cfg = PatchScalerConfig(dit=asdict(PRESETS["tiny"]), grm_widths=(16, 32, 64), grm_blocks=1)
    return PatchScaler.from_parts(
        random_sd_parts("tiny", seed=0, text_encoder=False), cfg, random_nets(cfg, seed=1)
    )


def test_patchscaler_partial_device_map_unified_seed_and_progress(ps):
    lr = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    ref, _ = ps.restore(lr, seed=3)
    # groups the map leaves out run on the model's device; the output does not change
    part, _ = ps.restore(lr, seed=3, devices={"hard": "cpu"})
    assert torch.equal(part, ref)
    uni, _ = ps.restore(lr, seed=3, unified=True)
    uni_dev, _ = ps.restore(lr, seed=3, unified=True, devices={"simple": "cpu", "hard": "cpu"})
    assert torch.equal(uni, uni_dev)
    # the VAE posterior sample follows the seed: reproducible, and another seed differs
    a, _ = ps.restore(lr, seed=5, sample_posterior=True)
    b, _ = ps.restore(lr, seed=5, sample_posterior=True)
    c, _ = ps.restore(lr, seed=6, sample_posterior=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    events = []
    _, info = ps.restore(lr, seed=3, progress=events.append)
    calls = [e for e in events if e.get("stage") == "pgs"]
    assert calls[0]["done"] == 0 and calls[-1]["done"] == calls[-1]["total"] == info["denoiser_calls"]
    assert all(e["unit"] == "call" for e in calls)


@pytest.mark.parametrize("damage", ["empty_unet", "truncated", "pickle_bin", "wrong_shape"])
def test_broken_base_folders_are_one_line_errors(damage, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_sd_dir, base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "empty_unet":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "pickle_bin":
        weights.unlink()
        (base / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    else:
        cfg = json.loads((base / "unet" / "config.json").read_text())
        cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
        (base / "unet" / "config.json").write_text(json.dumps(cfg))
    _img(tmp_path / "a.png")
    rc = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(base),
               "--weights", str(pisa_dir), "-q"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    assert f"{base / 'unet'}: cannot load the base model's unet" in err[0] and "--base" in err[0]


def test_library_errors_name_flags_in_the_cli_and_arguments_in_python(
    tmp_path, tiny_sd_dir, capsys, monkeypatch
):
    """One message, two readers: the same failure names `weights=PATH` / `gt_dir` to a Python caller
    and `--weights PATH` / `--gt` to a shell user, never the other's spelling."""
    import diffsr
    from diffsr.errors import WeightsNotFoundError
    from diffsr.metrics import evaluate

    monkeypatch.delenv("DIFFSR_PISA_WEIGHTS", raising=False)
    _img(tmp_path / "a.png")
    with pytest.raises(WeightsNotFoundError) as e:
        diffsr.load("pisa", base=tiny_sd_dir, device="cpu")
    assert "pass weights=PATH or set DIFFSR_PISA_WEIGHTS" in str(e.value) and "--" not in str(e.value)
    assert (
        main(
            ["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_sd_dir), "-q"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "pass --weights PATH or set DIFFSR_PISA_WEIGHTS" in err and "weights=" not in err

    with pytest.raises(DiffSRError, match=r"\(gt_dir\)"):
        evaluate(tmp_path, None, "psnr")
    assert main(["eval", "--pred", str(tmp_path), "--metrics", "psnr"]) == 2
    err = capsys.readouterr().err
    assert "(--gt)" in err and "gt_dir" not in err

    # `name=` in a library message becomes the command's flag: tile sizes checked by the API
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_sd_dir),
                 "--weights", str(tmp_path / "none.pkl"), "--tile-size", "48", "--tile-overlap", "60", "-q"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--tile-overlap 60" in err and "tile_overlap=" not in err
