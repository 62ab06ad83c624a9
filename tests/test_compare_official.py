"""benchmarks/compare_official.py and official_shim.py: the shim runs an authors'-style script that
calls CUDA on a CPU without editing it, the report's arithmetic, the weights' format details; and the
allocator setting of diffsr's commands (allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_official as co  # noqa: E402

FAKE_PISASR = """
import time, torch

class PiSASR_eval(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        self.device = "cuda"
        self.lin = torch.nn.Linear(4, 4).to(self.device)
        self.t = torch.tensor([1], device=self.device).long()

    def forward(self, default, c_t, prompt=None):
        torch.cuda.synchronize()
        start = time.time()
        out = self.lin(c_t.cuda()) + torch.zeros(c_t.shape, device=torch.device("cuda:0"))
        torch.cuda.synchronize()
        return time.time() - start, out
"""

FAKE_TEST = """
import argparse, os, torch
from pisasr import PiSASR_eval

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir")
    args = p.parse_args()
    model = PiSASR_eval(args)
    t, out = model(True, torch.ones(1, 4).cuda())
    os.makedirs(args.output_dir, exist_ok=True)
    torch.save(out.cpu(), os.path.join(args.output_dir, "out.pt"))
"""


def _fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "PiSA-SR"
    repo.mkdir()
    (repo / "pisasr.py").write_text(textwrap.dedent(FAKE_PISASR))
    (repo / "test_pisasr.py").write_text(textwrap.dedent(FAKE_TEST))
    return repo


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim maps CUDA to the CPU only without CUDA")
def test_shim_runs_cuda_code_on_the_cpu_and_leaves_the_checkout_untouched(tmp_path):
    repo = _fake_repo(tmp_path)
    before = co.tree_digest(repo)
    times = tmp_path / "times.json"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, str(co.SHIM), "pisa", str(repo), str(times), "--",
                        "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "out" / "out.pt")
    assert out.shape == (1, 4) and out.device.type == "cpu"
    marks = json.loads(times.read_text())
    assert marks["start"] <= marks["first_call"] <= marks["end"]
    assert co.tree_digest(repo) == before  # no file edited, no __pycache__ written
    assert not list(repo.rglob("__pycache__"))


def test_tree_digest_sees_an_edit_and_a_new_file(tmp_path):
    repo = _fake_repo(tmp_path)
    d0 = co.tree_digest(repo)
    (repo / "pisasr.py").write_text((repo / "pisasr.py").read_text() + "\n# edited\n")
    d1 = co.tree_digest(repo)
    (repo / "extra.py").write_text("")
    assert len({d0, d1, co.tree_digest(repo)}) == 3


def test_check_checkout_reports_other_commits_and_modified_files(tmp_path):
    repo = _fake_repo(tmp_path)
    assert "not a git checkout" in co.check_checkout(repo, "0" * 40)
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=n"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert co.check_checkout(repo, head) == ""
    assert "not the pinned" in co.check_checkout(repo, "0" * 40)
    (repo / "pisasr.py").write_text("# changed\n")
    assert "modified" in co.check_checkout(repo, head)


def _run(case, tool, rnd, wall, inf, peak, rc=0):
    return co.Run(case, tool, rnd, wall, inf, peak, "rss", rc, "")


def test_summary_takes_medians_of_successful_runs_and_ratios_diffsr_over_authors():
    runs = [
        _run("a", "authors", 1, 100.0, 60.0, 10 * 2**30),
        _run("a", "diffsr", 1, 70.0, 40.0, 5 * 2**30),
        _run("a", "authors", 2, 110.0, 66.0, 11 * 2**30),
        _run("a", "diffsr", 2, 80.0, 45.0, 6 * 2**30),
        _run("a", "authors", 3, 90.0, 57.0, 9 * 2**30),
        _run("a", "diffsr", 3, 999.0, 999.0, 99 * 2**30, rc=1),  # a failed run is left out
    ]
    (row,) = co.summarize(runs)
    assert row["authors"]["runs"] == 3 and row["diffsr"]["runs"] == 2
    assert row["authors"]["inference_s"] == 60.0 and row["diffsr"]["inference_s"] == 42.5
    assert row["ratio_inference_s"] == pytest.approx(42.5 / 60.0)
    assert row["ratio_wall_s"] == pytest.approx(75.0 / 100.0)
    assert row["ratio_peak_bytes"] == pytest.approx(5.5 / 10)
    table = co.format_table([row])
    assert "0.71×, 0.55×" in table and "60.0 s" in table and "5.50 GiB" in table


def test_ratio_and_median_without_values():
    assert co.ratio(None, 2.0) is None and co.ratio(1.0, None) is None and co.ratio(1.0, 0) is None
    assert co.median([None, None]) is None and co.median([3.0, None, 1.0]) == 2.0


def test_max_diff_of_two_images(tmp_path):
    import numpy as np
    from PIL import Image

    a = np.zeros((4, 5, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 7
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    assert co.max_diff(tmp_path / "a.png", tmp_path / "b.png") == (7, pytest.approx(7 / 60))
    assert co.max_diff(tmp_path / "a.png", tmp_path / "missing.png") is None


def test_parse_pythons():
    assert co.parse_pythons(["/p"]) == {"pisa": "/p", "s3diff": "/p", "vae": "/p"}
    assert co.parse_pythons(["pisa=/a", "s3diff=/b"]) == {"pisa": "/a", "s3diff": "/b", "vae": "/a"}


def test_commands_name_the_authors_flags(tmp_path):
    case = co.CASES["pisa-adjustable-128"]
    cmd = co.official_command(case, tmp_path, tmp_path / "PiSA-SR", tmp_path / "o", tmp_path / "t", "py")
    assert cmd[:3] == ["py", str(co.SHIM), "pisa"]
    assert "--default" not in cmd and cmd[cmd.index("--lambda_pix") + 1] == "0.6"
    assert cmd[cmd.index("--mixed_precision") + 1] == "fp32"
    d = co.diffsr_command(case, tmp_path, tmp_path / "o", tmp_path / "t", "cpu")
    assert d[d.index("--lambda-sem") + 1] == "1.3" and d[d.index("--method") + 1] == "pisa"
    s = co.official_command(
        co.CASES["s3diff-128"], tmp_path, tmp_path / "S3Diff", tmp_path / "o", tmp_path / "t", "py"
    )
    assert "in128" in (tmp_path / "o" / "sr_test.yaml").read_text() and "--de_net_path" in s


def test_narrow_posterior_makes_sampling_equal_the_mode(tiny_parts):
    from diffsr.synthetic import narrow_posterior

    vae = narrow_posterior(tiny_parts.vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        sample = dist.sample(generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dist.std, torch.full_like(dist.std, 3.059e-7), rtol=1e-3)
    assert (sample - dist.mode()).abs().max() < 5e-6


def test_saved_text_encoder_uses_the_released_key_names(tiny_sd_dir):
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from diffsr.synthetic import random_sd_parts

    (f,) = (tiny_sd_dir / "text_encoder").glob("*.safetensors")
    with safe_open(f, "pt") as s:
        keys = list(s.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)
    loaded = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval()
    built = random_sd_parts("tiny", seed=0).text_encoder
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids)[0], built(ids)[0])


# ------------------------------------------------------------------------------------------------
# The allocator setting
ALLOC_PROBE = """
import json, sys
import numpy as np
from diffsr import allocator
applied = allocator.tune_malloc() if sys.argv[1] == "tune" else False
before = allocator.mmapped_blocks()
a = np.ones(64 * 2**20, np.uint8)  # 64 MiB: glibc's default serves it by its own mmap
print(json.dumps({"applied": applied, "delta": allocator.mmapped_blocks() - before}))
"""


def _probe(mode: str, **env) -> dict:
    r = subprocess.run([sys.executable, "-c", ALLOC_PROBE, mode], capture_output=True, text=True,
                       env=dict(os.environ, **env))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_keeps_large_blocks_off_mmap():
    assert _probe("plain") == {"applied": False, "delta": 1}
    assert _probe("tune") == {"applied": True, "delta": 0}
    assert _probe("tune", DIFFSR_MALLOC="system") == {"applied": False, "delta": 1}


@pytest.mark.parametrize("command", ["upscale", "web", "bench"])
def test_commands_tune_malloc_at_start(monkeypatch, command):
    from diffsr import allocator, cli

    calls = []

    class Stop(Exception):
        pass

    def fake():
        calls.append(command)
        raise Stop

    monkeypatch.setattr(allocator, "tune_malloc", fake)
    argv = {"upscale": ["upscale", "x.png", "-o", "out"], "web": ["web"], "bench": ["bench"]}[command]
    with pytest.raises(Stop):
        cli.main(argv)
    assert calls == [command]
