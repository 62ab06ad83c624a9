"""Peak memory and time of the VAE decoder (and encoder) against the image size: diffsr's exact tiled
VAE at its default tiles, the untiled VAE, and diffusers' `enable_tiling()`; plus each one's difference
from the untiled output where that was computed.

    python benchmarks/bench_vae_tiling.py --size tiny --outputs 512 1024 2048
    python benchmarks/bench_vae_tiling.py --size sd21 --outputs 512 1024 2048 --skip-untiled 2048
    python benchmarks/bench_vae_tiling.py --size sd21 --device cuda --dtype fp16 --outputs 512 2048

Every case runs in a fresh process (freed memory does not always return to the OS, so one process
would carry one case's peak into the next). Peak memory: RSS on the CPU, torch.cuda.max_memory_allocated
on a GPU. Random weights of the real shapes: time and memory are those of the real VAE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("diffsr", "untiled", "diffusers")


def worker(args) -> dict:
    import torch

    from diffsr import bench
    from diffsr.devices import resolve_device, resolve_dtype
    from diffsr.latents import vae_decode, vae_encode
    from diffsr.synthetic import random_sd_parts

    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    dt = resolve_dtype(args.dtype, dev)
    vae = random_sd_parts(args.size, seed=0, text_encoder=False, device=dev, dtype=dt).vae
    n = args.output // 8
    g = torch.Generator().manual_seed(0)
    if args.stage == "decode":
        inp = (torch.randn(1, 4, n, n, generator=g) * 0.8).to(dev)
    else:
        inp = (torch.rand(1, 3, args.output, args.output, generator=g) * 2 - 1).to(dev)
    huge = 1 << 20

    def run():
        if args.impl == "diffusers":
            vae.enable_tiling()
            with torch.no_grad():
                if args.stage == "decode":
                    return vae.decode(inp / vae.config.scaling_factor).sample.clamp(-1, 1)
                return vae.encode(inp.to(dt)).latent_dist.mode() * vae.config.scaling_factor
        if args.stage == "decode":
            return vae_decode(vae, inp, **({"tile": huge} if args.impl == "untiled" else {}))
        return vae_encode(vae, inp, **({"tile": huge} if args.impl == "untiled" else {}))

    base_rss = bench.peak(dev)[0]
    bench.reset_peak(dev)
    t = time.perf_counter()
    out = run()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    peak, kind = bench.peak(dev)
    if args.save:
        torch.save(out.float().cpu(), args.save)
    return {"seconds": seconds, "peak_bytes": peak, "peak_kind": kind, "before_bytes": base_rss}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "sd21"))
    p.add_argument("--outputs", type=int, nargs="+", default=[512, 1024, 2048], help="image sides (pixels)")
    p.add_argument("--stages", nargs="+", default=["decode", "encode"], choices=("decode", "encode"))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--skip-untiled", type=int, nargs="*", default=[], help="sides too large to run untiled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write all results here")
    # worker mode (one case in this process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--output", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    import tempfile

    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for side in args.outputs:
                ref = None
                for impl in ["untiled"] + [i for i in args.impls if i != "untiled"]:
                    if impl not in args.impls and impl != "untiled":
                        continue
                    if impl == "untiled" and side in args.skip_untiled:
                        continue
                    save = os.path.join(tmp, f"{stage}-{side}-{impl}.pt")
                    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--stage", stage,
                           "--output", str(side), "--size", args.size, "--device", args.device,
                           "--dtype", args.dtype, "--threads", str(args.threads), "--save", save]  # fmt: skip
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(f"{stage} {side} {impl}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    out = torch.load(save)
                    if impl == "untiled":
                        ref = out
                    r["max_abs_diff_vs_untiled"] = float((out - ref).abs().max()) if ref is not None else None
                    r["mean_abs_diff_vs_untiled"] = (
                        float((out - ref).abs().mean()) if ref is not None else None
                    )
                    r.update(stage=stage, side=side, impl=impl)
                    if impl in args.impls:
                        results.append(r)
                    os.remove(save)
                    diff = r["max_abs_diff_vs_untiled"]
                    print(f"{stage:6s} {side:5d}px {impl:9s} {r['seconds']:8.2f} s  peak {r['peak_bytes'] / 2**30:6.2f} GiB"
                          f"  max|Δ| vs untiled {'-' if diff is None else f'{diff:.2e}'}", flush=True)  # fmt: skip
    for stage in args.stages:
        base = [r for r in results if r["stage"] == stage and r["impl"] == "diffsr"]
        if len(base) >= 2:
            lo, hi = min(base, key=lambda r: r["side"]), max(base, key=lambda r: r["side"])
            print(f"{stage}: diffsr peak at {hi['side']}px / at {lo['side']}px = "
                  f"{hi['peak_bytes'] / lo['peak_bytes']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
