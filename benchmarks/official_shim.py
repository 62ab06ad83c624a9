"""Run the authors' own inference code, unmodified, and time it (started by compare_official.py).

This file runs under the AUTHORS' environment (their pinned torch / diffusers / peft), so it imports
nothing from diffsr. Their files are never edited: every adaptation is applied from here, in memory,
before their script runs:

- on a machine without CUDA, a torch function mode maps every "cuda" device to "cpu" (factory
  functions, `.to(...)`, `.cuda()`), and `torch.cuda.synchronize` becomes a no-op; on a CUDA machine
  nothing is changed;
- S3Diff: `inference_s3diff.py` scores its outputs with pyiqa metrics after the loop (their weights
  are downloads); `pyiqa.create_metric` is replaced by a function that ends the run there, and the
  OpenAI `clip` package it imports but never uses is an empty module when it is not installed;
- timing: the first call of the model's per-image entry point (PiSA-SR: `PiSASR_eval.forward`,
  S3Diff: the degradation estimator `DEResNet.forward`) marks the start of inference; the end of
  the per-image loop marks its end.

    python official_shim.py pisa   REPO TIMES.json -- <test_pisasr.py arguments>
    python official_shim.py s3diff REPO TIMES.json -- <inference_s3diff.py arguments>
    python official_shim.py vae    REPO TIMES.json -- SD_DIR LATENT.pt OUT.png TILE

TIMES.json receives {"start", "first_call", "end", "cuda_peak"} (time.time() seconds, bytes).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import types

START = time.time()
MARKS: dict = {"start": START, "first_call": None, "end": None, "cuda_peak": None}


class StopRun(Exception):
    """Raised where the authors' script goes on past inference (metrics that need downloads)."""


def _cpu(x):
    import torch

    if isinstance(x, str) and x.startswith("cuda"):
        return "cpu"
    if isinstance(x, torch.device) and x.type == "cuda":
        return torch.device("cpu")
    return x


def install_cpu_shim() -> bool:
    """Map CUDA to the CPU when torch has no CUDA device. Returns whether the shim was installed."""
    import torch
    from torch.overrides import TorchFunctionMode

    if torch.cuda.is_available():
        return False

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            if func is torch.Tensor.to:
                args = tuple(_cpu(a) for a in args)
            return func(*args, **kwargs)

    CudaToCpu().__enter__()  # for the whole process
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    return True


def mark_first_call(cls, name: str) -> None:
    """Record the time of the first call of cls.name."""
    inner = getattr(cls, name)

    def wrapper(*args, **kwargs):
        if MARKS["first_call"] is None:
            MARKS["first_call"] = time.time()
        return inner(*args, **kwargs)

    setattr(cls, name, wrapper)


def run_script(path: str, argv: list[str]) -> None:
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    except StopRun:
        pass


def run_pisa(repo: str, argv: list[str]) -> None:
    sys.path.insert(0, repo)
    os.chdir(repo)
    import pisasr

    mark_first_call(pisasr.PiSASR_eval, "forward")
    run_script(os.path.join(repo, "test_pisasr.py"), argv)


def run_s3diff(repo: str, argv: list[str]) -> None:
    src = os.path.join(repo, "src")
    sys.path[:0] = [src, repo]
    os.chdir(repo)

    def stop(*_a, **_k):
        raise StopRun

    sys.modules["pyiqa"] = types.SimpleNamespace(create_metric=stop)  # evaluate() starts here
    try:
        import clip  # noqa: F401
    except ImportError:
        sys.modules["clip"] = types.ModuleType("clip")
    import de_net

    mark_first_call(de_net.DEResNet, "forward")
    run_script(os.path.join(src, "inference_s3diff.py"), argv)


def run_vae(repo: str, argv: list[str]) -> None:
    """The VAE decoder alone, tiled as PiSA-SR's `_init_tiled_vae` sets it up (their VAEHook)."""
    sd_dir, latent_path, out_path, tile = argv
    sys.path.insert(0, repo)
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from src.my_utils.vaehook import VAEHook

    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae").to("cuda").eval().requires_grad_(False)
    dec = vae.decoder
    dec.original_forward = dec.forward
    dec.forward = VAEHook(dec, int(tile), is_decoder=True, fast_decoder=False, fast_encoder=False,
                          color_fix=False, to_gpu=True)  # fmt: skip
    z = torch.load(latent_path).to("cuda")
    with torch.no_grad():
        MARKS["first_call"] = time.time()
        x = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        torch.cuda.synchronize()
    img = ((x[0].float().cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255)
    Image.fromarray(img.astype(np.uint8)).save(out_path)


def main() -> None:
    kind, repo, times = sys.argv[1:4]
    argv = sys.argv[4:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    repo = os.path.abspath(repo)
    install_cpu_shim()
    {"pisa": run_pisa, "s3diff": run_s3diff, "vae": run_vae}[kind](repo, argv)
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        MARKS["cuda_peak"] = torch.cuda.max_memory_allocated()
    MARKS["end"] = time.time()
    with open(times, "w") as f:
        json.dump(MARKS, f)


if __name__ == "__main__":
    main()
