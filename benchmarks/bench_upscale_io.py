"""Images per second of `diffsr upscale` on a folder of many small images, with the reading of the
next image and the writing of finished ones on background threads (the default) and without
(`--no-io-overlap`), and with images batched through the model (`--batch-size`).

    python benchmarks/bench_upscale_io.py --images 48 --side 96                 # tiny random model, CPU
    python benchmarks/bench_upscale_io.py --size sd21 --device cuda --images 200 --side 128   # a GPU

Random weights of the `--size` shapes (tiny: a whole encode→UNet→decode in milliseconds, so the I/O
share is large; sd21: SD 2.1's real costs). Each mode runs twice in this process on fresh output
folders; the faster run counts (the first also warms caches).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--side", type=int, default=96, help="input side in pixels (outputs are 4x)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd21"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="the batched mode's --batch-size (0: skip it)")
    args = p.parse_args()

    import numpy as np
    from PIL import Image

    from diffsr.cli import main as cli
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
        rates = {}
        modes = [("overlapped", []), ("serial", ["--no-io-overlap"])]
        if args.batch_size > 1:
            modes.append((f"batch {args.batch_size}", ["--batch-size", str(args.batch_size)]))
        for mode, flags in modes:
            best = 0.0
            for r in range(args.repeats):
                out = root / f"out-{mode}-{r}"
                cmd = ["upscale", str(src), "-o", str(out), "--base", str(base), "--weights", str(weights), "-q",
                       "--device", args.device, *flags]  # fmt: skip
                t = time.perf_counter()
                with contextlib.redirect_stderr(io.StringIO()):
                    rc = cli(cmd)
                dt = time.perf_counter() - t
                if rc != 0:
                    print(f"{mode}: diffsr upscale failed ({rc})", file=sys.stderr)
                    return 1
                best = max(best, args.images / dt)
            rates[mode] = best
            print(f"{mode:<11} {best:7.2f} images/s  ({args.images} images {args.side}² → {4 * args.side}², "
                  f"{args.size}, {args.device}; model load included)")  # fmt: skip
        print(f"overlap speed-up {rates['overlapped'] / rates['serial']:.2f}x")
        if args.batch_size > 1:
            b = rates[f"batch {args.batch_size}"]
            print(
                f"batch {args.batch_size} speed-up {b / rates['overlapped']:.2f}x (over overlapped, batch 1)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
