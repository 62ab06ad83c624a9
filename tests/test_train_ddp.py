"""Multi-process training on CPU (gloo): gradients of the stage-2 semantic LoRA are all-reduced (the
authors' DDP wrapping misses them, so their processes drift apart) and the frozen pixel LoRA stays put."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_processes_stay_in_sync(tmp_path, tiny_sd_dir):
    hq = tmp_path / "hq"
    hq.mkdir()
    yy, xx = np.mgrid[0:80, 0:80]
    for i in range(8):
        img = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (4 + i)), np.sin((xx + yy) / 7)], -1) * 100 + 128
        Image.fromarray(img.astype(np.uint8)).save(hq / f"{i}.png")
    out = tmp_path / "run"
    driver = Path(__file__).with_name("ddp_train_driver.py")
    port = str(29500 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(driver), str(hq), str(tiny_sd_dir), str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    s0, s1 = (load_file(out / f"stage1-rank{r}.safetensors") for r in (0, 1))
    f0, f1 = (load_file(out / f"final-rank{r}.safetensors") for r in (0, 1))
    for k in f0:
        assert torch.equal(f0[k], f1[k]), f"processes disagree on {k}"  # all-reduced gradients
    pix = [k for k in f0 if ".pix." in k]
    sem_b = [k for k in f0 if ".lora_B.sem." in k]
    assert all(torch.equal(f0[k], s0[k]) for k in pix)  # frozen in stage 2
    assert any(not torch.equal(f0[k], s0[k]) for k in sem_b)  # trained in stage 2
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    # the schedule advances once per update, not once per process: stage 2 is linear over 2 steps
    rows = [r.split(",") for r in (out / "logs.csv").read_text().splitlines()[1:]]
    lrs = {int(r[0]): float(r[2]) for r in rows if r[1] == "lr"}
    assert lrs[2] == pytest.approx(0.5e-3) and lrs[3] == 0.0
    assert len([r for r in rows if r[1] == "loss" and r[0] == "2"]) == 1  # one row: the ranks' mean
    assert "rank1:" not in res.stdout  # rank 0 speaks for the run
