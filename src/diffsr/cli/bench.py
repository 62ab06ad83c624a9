"""`diffsr bench`: time and peak memory of each method's modes, on random or real weights."""

from __future__ import annotations

import argparse
import json
import sys

from ._args import positive_int, quiet_libraries


def register(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="time methods and modes (random weights of real shapes, or real weights)",
        description="Per-image wall-clock (warm-up runs, then repeated runs: median, min, max) and peak "
        "memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU) of each method's modes: PiSA-SR "
        "default / adjustable / re-render, S3Diff batched CFG / two passes, PatchScaler PGS / unified sampling "
        "(with its denoiser calls and patch evaluations per image). Without --weights/--base the "
        "models have random weights of the --size config, so it runs where no weights exist.",
    )
    b.add_argument(
        "--method", nargs="+", default=["pisa", "s3diff"], choices=("pisa", "s3diff", "patchscaler")
    )
    b.add_argument(
        "--size", choices=("tiny", "sd21"), default="tiny", help="random-weight config (default tiny)"
    )
    b.add_argument("--input", type=positive_int, nargs="+", default=[128], metavar="SIDE",
                   help="LR side(s) in pixels; output is 4x (default 128)")  # fmt: skip
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    b.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    b.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    b.add_argument("--repeats", type=positive_int, default=3, help="measured runs (default 3)")
    b.add_argument("--weights", help="benchmark real weights instead (one method)")
    b.add_argument("--base", help="SD base for --weights")
    b.add_argument("--de-net", help="S3Diff estimator for --weights")
    b.add_argument("--json", metavar="FILE", help="write all numbers, versions and the device here")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    from ..bench import run_benchmark
    from ..devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    load_kwargs = None
    if args.weights or args.base:
        if len(args.method) != 1:
            print("diffsr: error: --weights/--base benchmark one --method at a time", file=sys.stderr)
            return 2
        load_kwargs = {"weights": args.weights, "base": args.base}
        if args.method[0] == "s3diff":
            load_kwargs["de_net"] = args.de_net
    results = run_benchmark(
        args.method,
        size=args.size,
        inputs=args.input,
        device=device,
        dtype=dtype,
        warmup=max(0, args.warmup),
        repeats=args.repeats,
        load_kwargs=load_kwargs,
        log=lambda s: print(s, flush=True),
    )
    if args.json:
        from pathlib import Path

        from ..checkpoints import atomic_write

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    return 0
