"""Per-image time and peak memory of each method's modes, on random weights of the real shapes.

    python benchmarks/bench_methods.py --method pisa s3diff --size tiny --input 64
    python benchmarks/bench_methods.py --method pisa --size sd21 --input 128 --warmup 0 --repeats 1
    python benchmarks/bench_methods.py --method s3diff --size sd21 --device cuda --dtype fp16 --input 128 512

PiSA-SR: default (merged) vs adjustable (one batched UNet call) vs re-render (VAE decode only).
S3Diff: classifier-free guidance in one batched UNet call vs two passes (the authors' way).
Random weights have the real shapes, so time and memory are those of the real models; outputs are
meaningless. Prints a table per method and size; --json writes every number with versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from diffsr.bench import environment, format_table, measure, method_cases, random_model
from diffsr.devices import resolve_device, resolve_dtype


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", nargs="+", default=["pisa", "s3diff"], choices=("pisa", "s3diff"))
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
    results = {"environment": environment(device, dtype), "size": a.size, "runs": []}
    for method in a.method:
        t = time.perf_counter()
        model = random_model(method, a.size, device=device, dtype=dtype)
        print(f"built random-weight {method} ({a.size}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for side in a.input:
            lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            rows = [measure(name, fn, device=device, warmup=a.warmup, repeats=a.repeats)
                    for name, fn in method_cases(method, model, lr)]  # fmt: skip
            print(f"\n{method}, {a.size}, {side}->{4 * side}, {device} {str(dtype).removeprefix('torch.')}:")
            print(format_table(rows))
            results["runs"].append(
                {"method": method, "input": side, "output": 4 * side, "cases": [r.to_dict() for r in rows]}
            )
        del model
        gc.collect()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
