"""PiSA-SR speed and peak memory: default vs adjustable vs re-render, on random weights.

    python benchmarks/bench_pisa.py --size tiny --input 128
    python benchmarks/bench_pisa.py --size sd21 --input 128 --repeats 1 --warmup 0   # SD 2.1 shapes, CPU
    python benchmarks/bench_pisa.py --size sd21 --device cuda --dtype fp16 --input 128 512

Random weights have the real shapes, so time and memory are those of the real model; outputs are
meaningless. Prints a table per input size and, with --json, writes all numbers and versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from diffsr.bench import environment, format_table, measure
from diffsr.devices import resolve_device, resolve_dtype
from diffsr.methods.pisa import PiSASR, random_weights
from diffsr.synthetic import random_sd_parts


def bench_one_size(model: PiSASR, side: int, device, warmup: int, repeats: int):
    """Default, adjustable and re-render timings for one LR side length."""
    lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    kw = dict(device=device, warmup=warmup, repeats=repeats)
    rows = [
        measure("default (λ=1,1, merged)", lambda: model.restore(lr), **kw),
        measure(
            "adjustable (λ=0.5,0.8, batched)", lambda: model.restore(lr, lambda_pix=0.5, lambda_sem=0.8), **kw
        ),
    ]
    adj = model.adjustable(lr)
    rows.append(measure("re-render (decode only)", lambda: adj.render(0.7, 1.1), **kw))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "sd21"), default="tiny")
    p.add_argument("--input", type=int, nargs="+", default=[128], help="LR side(s) in pixels (output is 4x)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write results here")
    a = p.parse_args()

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    t = time.perf_counter()
    parts = random_sd_parts(a.size, seed=0, device=device)
    model = PiSASR.from_parts(parts, random_weights(parts.unet, seed=1), dtype=dtype)
    if dtype != torch.float32:
        torch.nn.Module.to(model.vae, torch.float32 if dtype == torch.float16 else dtype)
    gc.collect()
    print(
        f"built random-weight PiSA-SR ({a.size}) on {device} {dtype} in {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )

    results = {"environment": environment(device, dtype), "size": a.size, "runs": []}
    for side in a.input:
        rows = bench_one_size(model, side, device, a.warmup, a.repeats)
        print(f"\n{a.size} {side}->{4 * side} on {device} ({str(dtype).removeprefix('torch.')}):")
        print(format_table(rows))
        results["runs"].append({"input": side, "output": 4 * side, "cases": [r.to_dict() for r in rows]})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
