"""`diffsr upscale` under torchrun (CPU, gloo): the processes split the inputs, write the same files as
one process, resume a partial set, and all exit non-zero with the run's totals when an image fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _same(a, b) -> bool:
    """The same pixels, bit for bit (PNG metadata aside)."""
    x, y = (np.asarray(Image.open(p)) for p in (a, b))
    return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def _torchrun(args, tmp_path, n=2):
    port = str(29600 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port,
           "-m", "diffsr", "upscale", *map(str, args)]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_two_processes_write_what_one_writes(tmp_path, tiny_sd_dir, pisa_dir):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i:02d}.png" for i in range(7)]
    for name in names:
        Image.fromarray((rng.random((12, 10, 3)) * 255).astype(np.uint8)).save(src / name)
    (src / "01.png").write_bytes(b"not a png")  # index 1: process 1's share
    common = ["--base", tiny_sd_dir, "--weights", pisa_dir, "-q"]

    one = tmp_path / "one"  # the same thread count as the ranks: BLAS sums depend on it
    ref = subprocess.run([sys.executable, "-m", "diffsr", "upscale", str(src), "-o", str(one), *map(str, common)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert ref.returncode == 1 and "5 written" not in ref.stderr and "6 written" in ref.stderr

    two = tmp_path / "two"
    res = _torchrun([src, "-o", two, *common, "-v"], tmp_path)
    assert res.returncode != 0  # a bad file anywhere: every process exits 1
    assert "6 written, 0 skipped (exist), 1 failed (2 processes)" in res.stderr, res.stderr[-3000:]
    assert "01.png" in res.stderr
    processed = re.findall(r"in/(\d\d\.png) -> ", res.stderr)
    assert sorted(processed) == sorted(n for n in names if n != "01.png")  # each exactly once
    files = sorted(p.name for p in two.iterdir())
    assert files == sorted(p.name for p in one.iterdir()) and len(files) == 6
    for f in files:  # bit for bit (each process computes on "cpu", as the single one does)
        assert _same(two / f, one / f), f

    for f in files[:3]:  # a run killed half-way: the restart does the rest
        (two / f).unlink()
    res = _torchrun([src, "-o", two, *common], tmp_path)
    assert "3 written, 3 skipped (exist), 1 failed (2 processes)" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in two.iterdir()) == files
    assert all(_same(two / f, one / f) for f in files)
    assert res.stderr.count("written, ") == 1  # one summary, from process 0
