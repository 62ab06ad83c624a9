"""Per-image time and peak memory of each method's modes (a wrapper of `diffsr bench`).

    python benchmarks/bench_methods.py --method pisa s3diff --size tiny --input 64
    python benchmarks/bench_methods.py --method pisa s3diff --size sd21 --input 128 --warmup 1 --repeats 1
    python benchmarks/bench_methods.py --method s3diff --size sd21 --device cuda --dtype fp16 --input 128 512

PiSA-SR: default (merged) vs adjustable (one batched UNet call) vs re-render (VAE decode only).
S3Diff: classifier-free guidance in one batched UNet call vs two passes (the authors' way).
PatchScaler: patch-adaptive group sampling vs unified sampling (every patch 20 steps from t = 1000).
Random weights have the real shapes, so time and memory are those of the real models.
"""

import sys

from diffsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
