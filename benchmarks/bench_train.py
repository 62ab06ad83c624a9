"""Seconds per training step and peak memory: PiSA-SR's stage-2 step (L2 + LPIPS + CSD: the costliest
one) with and without gradient checkpointing, and S3Diff's step (reconstruction and GAN updates of the
generator, two discriminator updates), at SD 2.1 size (512² crops, random weights of the real shapes).

    python benchmarks/bench_train.py --size sd21 --device cuda --batch-size 4     # a GPU
    python benchmarks/bench_train.py --size sd21 --device cpu --steps 1           # what a CPU can do
    python benchmarks/bench_train.py --size tiny --steps 2                        # a quick check

Every case runs in a fresh process (the CPU peak is the process's RSS high-water mark, which would
carry one case's peak into the next; on a GPU, torch.cuda.max_memory_allocated over the timed steps).
The random SD folder is written once into --work-dir and reused. LPIPS and the DINO discriminator use
random backbones of the real shapes (same cost), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "pisa-stage2": ("pisa", False),
    "pisa-stage2-gradckpt": ("pisa", True),
    "s3diff": ("s3diff", False),
    "s3diff-gradckpt": ("s3diff", True),
}


def prepare(work: Path, size: str) -> tuple[Path, Path, Path]:
    """The random SD folder, a folder of HQ images and a random degradation-estimator file, made once."""
    import numpy as np
    import torch
    from PIL import Image

    from diffsr.methods.s3diff import DegradationEstimator
    from diffsr.synthetic import write_random_sd_folder

    base = work / f"sd-{size}"
    if not (base / "unet").is_dir():
        write_random_sd_folder(base, size, seed=0)
    hq = work / "hq"
    if not hq.is_dir():
        hq.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(hq / f"{i}.png")
    de = work / "de_net.pth"
    if not de.is_file():
        torch.manual_seed(0)
        torch.save(DegradationEstimator().state_dict(), de)
    return base, hq, de


def run_case(name: str, *, size: str, device: str, steps: int, batch_size: int, work: Path) -> dict:
    """Train `steps` steps of one case (after one untimed warm-up step); time and peak memory."""
    import torch
    from accelerate import Accelerator

    from diffsr import bench
    from diffsr.train.config import build_config
    from diffsr.train.data import HQImageDataset
    from diffsr.train.loop import MicroBatches, build_trainer, derived_seed

    method, ckpt = CASES[name]
    base, hq, de = prepare(work, size)
    crop = 512 if size == "sd21" else 64
    common = dict(data=[str(hq)], output_dir=str(work / "run"), base=str(base), batch_size=batch_size, crop_size=crop,
                  gradient_checkpointing=ckpt, lpips_pretrained=False, sample_posterior=True)  # fmt: skip
    if method == "pisa":  # straight into stage 2
        cfg = build_config("pisa", dict(common, pix_steps=0, sem_steps=steps + 1))
    else:
        tiny = size == "tiny"
        cfg = build_config("s3diff", dict(
            common, de_net=str(de), max_steps=steps + 1, grad_accum=1, disc_pretrained=False,
            disc_backbone="vit_tiny_patch16_224" if tiny else "vit_base_patch16_224.dino",
            disc_layers=[0, 1, 2] if tiny else [4, 8, 11], disc_img_size=64 if tiny else 224,
        ))  # fmt: skip
    dev = torch.device(device)
    trainer = build_trainer(cfg)
    trainer.setup(Accelerator(cpu=dev.type == "cpu"))
    trainer.on_step(0)
    data = MicroBatches(HQImageDataset(cfg.data, crop_size=crop, seed=0), cfg, 0, 1, per_epoch=1, device=dev)

    def step(k: int) -> dict:
        batch = data[0]
        gen = lambda kind: torch.Generator().manual_seed(derived_seed(0, kind, k))  # noqa: E731
        return trainer.train_step(batch, k, gen)

    step(0)
    bench._sync(dev)
    bench.reset_peak(dev)
    times = []
    for k in range(1, steps + 1):
        t = time.perf_counter()
        logs = step(k)
        bench._sync(dev)
        times.append(time.perf_counter() - t)
    peak, kind = bench.peak(dev)
    return {"case": name, "method": method, "gradient_checkpointing": ckpt, "size": size, "crop": crop,
            "batch_size": batch_size, "sec_per_step": sorted(times)[len(times) // 2], "times": times,
            "peak_bytes": peak, "peak_kind": kind, "losses": {k: float(v) for k, v in logs.items()},
            "env": bench.environment(dev, torch.float32)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--size", default="sd21", choices=("tiny", "sd21"))
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--work-dir", default="/tmp/diffsr-bench-train", help="where the random SD folder is cached"
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one case, in this process
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    kw = dict(size=args.size, device=args.device, steps=args.steps, batch_size=args.batch_size, work=work)
    if args.worker:
        print(json.dumps(run_case(args.worker, **kw)))
        return 0
    prepare(work, args.size)
    rows = []
    print(
        f"{'case':<24}{'s/step':>10}{'peak GiB':>10}  ({args.size}, {args.device}, batch {args.batch_size})"
    )
    for name in args.cases:
        cmd = [sys.executable, __file__, "--worker", name, "--size", args.size, "--device", args.device,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--work-dir", str(work)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{name:<24} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:<24}{row['sec_per_step']:>10.2f}{row['peak_bytes'] / 2**30:>10.2f}  ({row['peak_kind']})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
