"""Timing and peak-memory measurement shared by `benchmarks/` scripts and `diffsr bench`.

Peak memory is the process's peak RSS on CPU (VmHWM, reset before each measured call through
/proc/self/clear_refs where Linux allows it) and torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Measurement:
    """Wall-clock seconds of each repeat, their median/min/max, and the peak memory of the repeats."""

    name: str
    seconds: list[float]
    peak_bytes: int | None
    peak_kind: str
    extra: dict = field(default_factory=dict)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads) per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(median=self.median, min=min(self.seconds), max=max(self.seconds))
        return d


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> bool:
    """Reset the peak-memory counter; False when the platform cannot (then the peak is since start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    hwm = _read_hwm()
    if hwm is not None:
        return hwm, "rss_peak"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_peak_since_start"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, fn: Callable[[], object], *, device: torch.device, warmup: int = 1, repeats: int = 3
) -> Measurement:
    """Run fn `warmup` times unmeasured, then `repeats` times timed; peak memory over the repeats."""
    for _ in range(warmup):
        fn()
    _sync(device)
    reset_peak(device)
    times, cpu = [], []
    out = None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    bytes_, kind = peak(device)
    info = out[1] if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else {}
    extra = {k: info[k] for k in REPORTED if k in info}
    return Measurement(name, times, bytes_, kind, extra, cpu)


# simple / medium / hard fractions forced by the PatchScaler benchmark (an assumption: the paper
# reports no split); every window in one group is the other extreme, also reported
PGS_SPLIT = (0.5, 0.3, 0.2)

# per-image counts worth reporting next to the time (PatchScaler's sampler statistics)
REPORTED = ("patches", "groups", "denoiser_calls", "patch_evaluations", "speedup")


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Versions and hardware, recorded next to every benchmark result."""
    import diffusers
    import peft
    import transformers

    from . import __version__

    env = {
        "diffsr": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:  # other work on the machine inflates wall times: recorded next to them
        env["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        env["load_average_1_5_15"] = None
    env["commit"] = _commit()
    return env


def _commit() -> str | None:
    """The git commit of the diffsr checkout this runs from (with "+dirty" for uncommitted changes),
    or None outside a checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def format_table(rows: list[Measurement]) -> str:
    """A plain-text table: name, median, min, max seconds and peak memory (GiB)."""
    lines = [f"{'case':<38}{'median s':>10}{'min s':>9}{'max s':>9}{'cpu s':>9}{'peak GiB':>10}"]
    for m in rows:
        mem = f"{m.peak_bytes / 2**30:.2f}" if m.peak_bytes else "n/a"
        cpu = f"{statistics.median(m.cpu_seconds):.3f}" if m.cpu_seconds else "n/a"
        line = f"{m.name:<38}{m.median:>10.3f}{min(m.seconds):>9.3f}{max(m.seconds):>9.3f}{cpu:>9}{mem:>10}"
        if m.extra:
            line += "  " + " ".join(f"{k}={_short(v)}" for k, v in m.extra.items())
        lines.append(line)
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict):
        return "/".join(str(x) for x in v.values())
    return str(v)


def random_model(method: str, size: str = "tiny", *, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A method model with random weights of the `size` config ("tiny" or "sd21"): real shapes, real
    costs, meaningless outputs. Built in fp32 and cast the way `from_pretrained` casts."""
    from .methods.base import vae_dtype_for
    from .synthetic import random_sd_parts

    parts = random_sd_parts(size, seed=seed, device=device)
    torch.nn.Module.to(parts.vae, vae_dtype_for(None, dtype, device))
    if method == "pisa":
        from .methods import pisa

        return pisa.PiSASR.from_parts(parts, pisa.random_weights(parts.unet, seed=seed + 1), dtype=dtype)
    if method == "s3diff":
        from .methods import s3diff

        w = s3diff.random_weights(parts.unet, parts.vae, seed=seed + 1)
        return s3diff.S3Diff.from_parts(parts, w, dtype=dtype)
    if method == "patchscaler":
        from dataclasses import asdict

        from .methods.patchscaler.dit import PRESETS
        from .methods.patchscaler.model import PatchScaler, PatchScalerConfig, random_nets

        if size == "tiny":
            cfg = PatchScalerConfig(dit=asdict(PRESETS["tiny"]), grm_widths=(16, 32, 64), grm_blocks=1)
            nets = random_nets(cfg, seed=seed)
        else:  # real shapes: DiT-B/2, the default GRM and texture encoder, a 2,000-pair memory
            cfg = PatchScalerConfig()
            nets = random_nets(cfg, seed=seed, rtm_size=2000, classifier_widths=(64, 128, 256, 256))
        parts.unet = parts.text_encoder = None
        return PatchScaler.from_parts(parts, cfg, nets, dtype=dtype)
    raise ValueError(f"no random model for method {method!r}")


def method_cases(method: str, model, lr: torch.Tensor) -> list[tuple[str, Callable[[], object]]]:
    """The modes worth timing for each method, as (name, zero-argument callable)."""
    if method == "pisa":
        adj = model.adjustable(lr)
        return [
            ("default (λ=1,1, merged)", lambda: model.restore(lr)),
            ("adjustable (λ=0.5,0.8, batched)", lambda: model.restore(lr, lambda_pix=0.5, lambda_sem=0.8)),
            ("re-render (decode only)", lambda: adj.render(0.7, 1.1)),
        ]
    if method == "s3diff":
        return [
            ("batched CFG (one UNet call)", lambda: model.restore(lr)),
            ("two CFG passes (authors' way)", lambda: model.restore(lr, cfg_batched=False)),
        ]
    if method == "patchscaler":
        # Random weights give every window about the same confidence (all one group), so the benchmark
        # also forces a split: thresholds at quantiles of the windows' mean confidence.
        a = model.window_confidence(lr)
        g1, g2 = torch.quantile(a, 1 - PGS_SPLIT[0]).item(), torch.quantile(a, PGS_SPLIT[2]).item()
        split = (g1, min(g2, g1 - 1e-9)) if g1 > 0 else (1e-9, 0.0)  # γ1 > γ2 even for one window
        name = "PGS, split " + "/".join(f"{round(100 * f)}" for f in PGS_SPLIT) + " %"
        return [
            ("PGS (the model's own confidence)", lambda: model.restore(lr)),
            (name, lambda: model.restore(lr, thresholds=split)),
            ("unified (every patch tau=1000, N=20)", lambda: model.restore(lr, unified=True)),
        ]
    raise ValueError(f"no benchmark cases for method {method!r}")


def run_benchmark(
    methods: list[str],
    *,
    size: str = "tiny",
    inputs: list[int] = (128,),
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 1,
    repeats: int = 3,
    load_kwargs: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every case of every method at every LR side in `inputs` (square images, ×4 output).

    Random weights of `size` unless `load_kwargs` (weights/base/...) are given, then the real model
    is loaded with diffsr.load. Returns {"environment", "size", "runs": [{method, input, output,
    cases: [Measurement.to_dict()]}]} and logs a table per run."""
    import gc

    results = {"environment": environment(device, dtype), "size": size if not load_kwargs else "pretrained",
               "warmup": warmup, "repeats": repeats, "runs": []}  # fmt: skip
    for method in methods:
        t = time.perf_counter()
        if load_kwargs:
            from .api import load

            model = load(method, device=device, dtype=dtype, **load_kwargs).model
        else:
            model = random_model(method, size, device=device, dtype=dtype)
        log(f"built {method} ({results['size']}) on {device} in {time.perf_counter() - t:.1f} s")
        for side in inputs:
            lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            rows = [measure(name, fn, device=device, warmup=warmup, repeats=repeats)
                    for name, fn in method_cases(method, model, lr)]  # fmt: skip
            log(
                f"\n{method}, {side}->{4 * side}, {device} {str(dtype).removeprefix('torch.')}:\n{format_table(rows)}"
            )
            results["runs"].append(
                {
                    "method": method,
                    "input": side,
                    "output": 4 * side,
                    "pid": os.getpid(),
                    "cases": [r.to_dict() for r in rows],
                }
            )
        del model
        gc.collect()
    return results
