"""Time, peak memory and output difference of each method in fp32 / fp16 / bf16, at 128→512 and
512→2048 (one short go on a GPU; on a CPU fp16 is skipped and --size tiny keeps it quick).

    python benchmarks/bench_precision.py --size sd21 --device cuda                 # the GPU run
    python benchmarks/bench_precision.py --size tiny --device cpu --inputs 32 64   # a quick check

Each method's default mode (PiSA-SR λ = 1, 1; S3Diff batched CFG; PatchScaler PGS) on random weights of
the real shapes; the half-precision outputs are compared with the fp32 output of the same weights and
input (max and mean absolute difference, in [0, 1] pixel units).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["pisa", "s3diff", "patchscaler"])
    p.add_argument("--size", default="sd21", choices=("tiny", "sd21"))
    p.add_argument("--inputs", type=int, nargs="+", default=[128, 512], help="LR sides")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    from diffsr.bench import environment, measure, random_model
    from diffsr.devices import resolve_device, resolve_dtype

    dev = resolve_device(args.device)
    dtypes = [d for d in args.dtypes if not (d == "fp16" and dev.type != "cuda")]
    rows = []
    for method in args.methods:
        ref: dict[int, torch.Tensor] = {}
        for name in dtypes:
            dt = resolve_dtype(name, dev)
            model = random_model(method, args.size, device=dev, dtype=dt)
            for side in args.inputs:
                lr = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
                m = measure(f"{method} {name} {side}", lambda m=model, x=lr: m.restore(x), device=dev,
                            warmup=args.warmup if side == min(args.inputs) else 0, repeats=1)  # fmt: skip
                out = model.restore(lr)[0].float()
                if name == "fp32":
                    ref[side] = out
                diff = (out - ref[side]).abs() if side in ref else None
                row = {"method": method, "dtype": name, "input": side, "output": 4 * side,
                       "seconds": m.median, "peak_bytes": m.peak_bytes, "peak_kind": m.peak_kind,
                       "max_abs_diff_vs_fp32": None if diff is None else float(diff.max()),
                       "mean_abs_diff_vs_fp32": None if diff is None else float(diff.mean())}  # fmt: skip
                rows.append(row)
                d = (
                    "-"
                    if diff is None
                    else f"max {row['max_abs_diff_vs_fp32']:.4f} mean {row['mean_abs_diff_vs_fp32']:.5f}"
                )
                print(f"{method:12s} {name:5s} {side:4d}->{4 * side:<5d} {m.median:8.2f} s  "
                      f"peak {m.peak_bytes / 2**30:6.2f} GiB  vs fp32: {d}", flush=True)  # fmt: skip
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(dev, torch.float32), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
