"""`diffsr upscale`: folder trees, skip/overwrite, failures and exit codes, atomic outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffsr.cli import main


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 14, 3)) * 255).astype(np.uint8)).save(src / "a.jpg")
    Image.fromarray((rng.random((10, 10, 4)) * 255).astype(np.uint8)).save(src / "sub" / "b.png")
    Image.fromarray((rng.random((9, 11, 3)) * 255).astype(np.uint8)).save(src / "sub" / "deeper" / "c.webp")
    Image.fromarray((rng.random((9, 11)) * 255).astype(np.uint8)).save(src / "sub" / "g.bmp")
    (src / "notes.txt").write_text("not an image, skipped silently")
    return src


def run(args, tiny_sd_dir, pisa_dir):
    return main(["upscale", *map(str, args), "--base", str(tiny_sd_dir), "--weights", str(pisa_dir), "-q"])


def test_tree_mirrored_and_kinds_kept(tree, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    out = tmp_path / "out"
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png", "sub/b.png", "sub/deeper/c.png", "sub/g.png"]
    assert Image.open(out / "a.png").size == (56, 48)
    assert Image.open(out / "sub" / "b.png").mode == "RGBA"
    assert Image.open(out / "sub" / "g.png").mode == "L"
    assert "4 written, 0 skipped (exist), 0 failed" in capsys.readouterr().err


def test_skip_then_overwrite(tree, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.png").write_bytes(b"keep me")
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 0
    assert (out / "a.png").read_bytes() == b"keep me"
    assert "3 written, 1 skipped" in capsys.readouterr().err
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 0  # everything exists now: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert run([tree / "a.jpg", "-o", out, "--overwrite"], tiny_sd_dir, pisa_dir) == 0
    assert Image.open(out / "a.png").size == (56, 48)


def test_bad_file_reported_batch_continues_exit_nonzero(tree, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    (tree / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tree / "zz.jpg").write_text("text pretending to be a jpeg")
    out = tmp_path / "out"
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 1
    err = capsys.readouterr().err
    assert "4 written, 0 skipped (exist), 2 failed" in err
    assert "broken.png" in err and "zz.jpg" in err
    assert (out / "sub" / "deeper" / "c.png").exists()
    assert not (out / "sub" / "broken.png").exists() and not (out / "zz.png").exists()
    assert not [p for p in out.rglob(".*")]  # no temp files left behind


def test_ext_input_and_outscale(tree, tmp_path, tiny_sd_dir, pisa_dir):
    out = tmp_path / "out"
    assert (
        run(
            [
                tree / "a.jpg",
                tree / "sub" / "deeper" / "c.webp",
                "-o",
                out,
                "--ext",
                "input",
                "--outscale",
                "2",
            ],
            tiny_sd_dir,
            pisa_dir,
        )
        == 0
    )
    assert Image.open(out / "a.jpg").size == (28, 24)
    assert Image.open(out / "c.webp").size == (22, 18)


def test_interrupted_write_leaves_no_partial_file(tree, tmp_path, tiny_sd_dir, pisa_dir, monkeypatch):
    import diffsr.io as dio

    real = dio.Image.Image.save

    def dying_save(self, fp, *a, **k):
        real(self, fp, *a, **k)
        raise KeyboardInterrupt  # the user hits ^C right after the bytes were written

    monkeypatch.setattr(dio.Image.Image, "save", dying_save)
    out = tmp_path / "out"
    assert run([tree / "a.jpg", "-o", out], tiny_sd_dir, pisa_dir) == 130
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_missing_input_and_weights_are_one_line_errors(tmp_path, tiny_sd_dir, capsys, monkeypatch):
    assert main(["upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.png" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    monkeypatch.delenv("DIFFSR_PISA_WEIGHTS", raising=False)
    assert (
        main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--base", str(tiny_sd_dir)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DIFFSR_PISA_WEIGHTS" in err


def test_fp16_on_cpu_refused_before_work(tree, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    code = main(
        [
            "upscale",
            str(tree),
            "-o",
            str(tmp_path / "o"),
            "--base",
            str(tiny_sd_dir),
            "--weights",
            str(pisa_dir),
            "--device",
            "cpu",
            "--dtype",
            "fp16",
            "-q",
        ]
    )
    assert code == 2 and "fp16 is not supported on CPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["upscale", "x.png", "-o", "o", "--lambda-pix", "-1"])
    assert e.value.code == 2


def test_help_does_not_import_torch():
    code = "import sys; from diffsr.cli import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "False"


def test_same_stem_collision_is_reported(tree, tmp_path, tiny_sd_dir, pisa_dir, capsys):
    Image.new("RGB", (8, 8)).save(tree / "a.png")  # a.jpg and a.png both map to a.png
    out = tmp_path / "out"
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 1
    err = capsys.readouterr().err
    assert "already taken" in err and "--ext input" in err
    assert run([tree, "-o", tmp_path / "out2", "--ext", "input"], tiny_sd_dir, pisa_dir) == 0
    assert (tmp_path / "out2" / "a.png").exists() and (tmp_path / "out2" / "a.jpg").exists()


def run_s3(args, tiny_sd_dir, s3diff_dir):
    return main(["upscale", *map(str, args), "--method", "s3diff", "--base", str(tiny_sd_dir), "--weights",
                 str(s3diff_dir), "-q"])  # fmt: skip


def test_s3diff_tree_scores_and_overrides(tree, tmp_path, tiny_sd_dir, s3diff_dir, capsys):
    out = tmp_path / "out"
    assert run_s3([tree, "-o", out, "-v"], tiny_sd_dir, s3diff_dir) == 0
    err = capsys.readouterr().err
    assert "estimated=(blur=" in err and "4 written" in err
    assert Image.open(out / "sub" / "b.png").mode == "RGBA" and Image.open(out / "sub" / "g.png").mode == "L"
    assert Image.open(out / "a.png").size == (56, 48)
    out2 = tmp_path / "out2"
    assert run_s3([tree / "a.jpg", "-o", out2, "--blur", "0.9", "--noise", "0", "--tile-size", "4", "--tile-overlap", "1"],
                  tiny_sd_dir, s3diff_dir) == 0  # fmt: skip
    a, b = np.asarray(Image.open(out / "a.png")), np.asarray(Image.open(out2 / "a.png"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b).max() > 0


def test_method_specific_flags_checked(tree, tmp_path, tiny_sd_dir, s3diff_dir, pisa_dir, capsys):
    assert run_s3([tree, "-o", tmp_path / "o", "--lambda-pix", "0.5"], tiny_sd_dir, s3diff_dir) == 2
    assert "--lambda-pix applies to --method pisa" in capsys.readouterr().err
    assert run([tree, "-o", tmp_path / "o", "--blur", "0.5"], tiny_sd_dir, pisa_dir) == 2
    assert "--blur applies to --method s3diff" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["upscale", str(tree), "-o", "o", "--method", "s3diff", "--noise", "1.5"])
    assert run([tree, "-o", tmp_path / "o", "--tile-size", "8"], tiny_sd_dir, pisa_dir) == 2
    assert "--tile-overlap 32 must be smaller than --tile-size 8" in capsys.readouterr().err


def test_outputs_inside_the_input_folder_are_never_inputs(tree, tiny_sd_dir, pisa_dir, capsys):
    out = tree / "sr"
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 0
    assert run([tree, "-o", out], tiny_sd_dir, pisa_dir) == 0  # again: its own outputs are not inputs
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png", "sub/b.png", "sub/deeper/c.png", "sub/g.png"]
    assert "all 4 outputs exist" in capsys.readouterr().err


def test_output_that_is_a_file_and_nan_are_refused_before_loading(tree, tmp_path, capsys):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    assert main(["upscale", str(tree), "-o", str(f), "--weights", "/nonexistent"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    for flag in ("--lambda-pix", "--lambda-sem"):
        with pytest.raises(SystemExit) as e:
            main(["upscale", str(tree), "-o", str(tmp_path / "o"), flag, "nan"])
        assert e.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_api_refuses_non_finite_lambdas(pisa):
    import torch

    from diffsr.errors import ConfigError

    with pytest.raises(ConfigError, match="lambda_pix=nan must be a finite number"):
        pisa.restore(torch.rand(1, 3, 8, 8), lambda_pix=float("nan"))
