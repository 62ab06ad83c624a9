"""Images per second of `diffsr upscale` on a folder of many small images, with the reading of the
next image and the writing of finished ones on background threads (the default) and without
(`--no-io-overlap`), and with images batched through the model (`--batch-size`).

    python benchmarks/bench_upscale_io.py --images 48 --side 96                 # tiny random model, CPU
    python benchmarks/bench_upscale_io.py --images 48 --side 96 --torch-threads 1   # a core for I/O
    python benchmarks/bench_upscale_io.py --size sd21 --images 8 --side 64      # SD 2.1 shapes, CPU
    python benchmarks/bench_upscale_io.py --size sd21 --device cuda --images 200 --side 128   # a GPU

Random weights of the `--size` shapes (tiny: a whole encode→UNet→decode in milliseconds, so the I/O
share is large; sd21: SD 2.1's real costs). Each run is a fresh process (so its peak RSS is its own)
on a fresh output folder; each mode runs `--repeats` times and the fastest run counts. Images/s are
given with the model load and without it (the time inside `diffsr.api.load` is subtracted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs `diffsr upscale ARGS` in this fresh process and prints its wall time, the time spent loading
# the model, and the process's peak RSS (bytes) as one JSON line.
_RUN = """
import json, resource, sys, time
import torch
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
import diffsr.api as api
from diffsr.cli import main
load, spent = api.load, []
def timed_load(*a, **k):
    t = time.perf_counter()
    up = load(*a, **k)
    spent.append(time.perf_counter() - t)
    return up
api.load = timed_load
t = time.perf_counter()
rc = main(json.loads(sys.argv[1]))
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rc": rc, "seconds": seconds, "load": sum(spent), "peak_rss": peak}))
"""


def run_once(cmd: list[str], torch_threads: int = 0) -> dict:
    """`diffsr upscale` in a child process (torch_threads > 0: its intra-op threads):
    {"rc", "seconds", "load", "peak_rss"}."""
    child = [sys.executable, "-c", _RUN, json.dumps(cmd), str(torch_threads)]
    done = subprocess.run(child, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"rc": None}
    if result["rc"] != 0:  # a failed image would otherwise count as a fast one
        raise RuntimeError(f"diffsr upscale failed ({result['rc']}): {done.stderr.strip().splitlines()[-1:]}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--side", type=int, default=96, help="input side in pixels (outputs are 4x)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd21"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="the batched mode's --batch-size (0: skip it)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch's intra-op threads in each run (0: torch's default, all cores); 1 on a "
                   "2-core CPU leaves a core to the I/O threads, as a GPU leaves the CPU")  # fmt: skip
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from diffsr.methods.pisa import random_weights
    from diffsr.synthetic import random_sd_parts, write_random_sd_folder

    with tempfile.TemporaryDirectory(prefix="diffsr-bench-io-") as tmp:
        root = Path(tmp)
        base = write_random_sd_folder(root / "sd", args.size, seed=0)
        weights = random_weights(random_sd_parts(args.size, seed=0, text_encoder=False).unet, seed=1,
                                 std=0.05).save(root / "pisa")  # fmt: skip
        src = root / "in"
        src.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)).save(
                src / f"{i:04d}.png"
            )
        print(f"{args.images} images {args.side}² → {4 * args.side}², {args.size} random weights, {args.device}, "
              f"PiSA-SR, torch threads {args.torch_threads or 'default'}; best of {args.repeats}")  # fmt: skip
        print(f"{'mode':<11} {'images/s':>9} {'w/o load':>9} {'load s':>7} {'peak RSS':>9}")
        rates = {}
        modes = [("overlapped", []), ("serial", ["--no-io-overlap"])]
        if args.batch_size > 1:
            modes.append((f"batch {args.batch_size}", ["--batch-size", str(args.batch_size)]))
        for mode, flags in modes:
            runs = []
            for r in range(args.repeats):
                out = root / f"out-{mode}-{r}"
                runs.append(run_once(["upscale", str(src), "-o", str(out), "--base", str(base), "--weights",
                                      str(weights), "-q", "--device", args.device, *flags], args.torch_threads))  # fmt: skip
            best = min(runs, key=lambda x: x["seconds"])
            rates[mode] = args.images / (best["seconds"] - best["load"])
            print(f"{mode:<11} {args.images / best['seconds']:9.3g} {rates[mode]:9.3g} {best['load']:7.1f} "
                  f"{best['peak_rss'] / 2**30:7.2f} GiB")  # fmt: skip
        print(f"overlap speed-up {rates['overlapped'] / rates['serial']:.2f}x (without the load)")
        if args.batch_size > 1:
            b = rates[f"batch {args.batch_size}"]
            print(
                f"batch {args.batch_size} speed-up {b / rates['overlapped']:.2f}x (over overlapped, batch 1)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
