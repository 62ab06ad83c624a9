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
        "models have random weights of the --size config, so it runs where no weights exist. Several "
        "methods run one process each, so each peak is the method's own.",
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
    from ..allocator import tune_malloc

    tune_malloc()  # as upscale and web run (allocator.py; DIFFSR_MALLOC=system: off)
    if len(args.method) > 1 and not (args.weights or args.base):
        return _one_process_per_method(args)
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
        _write_json(args.json, results)
    return 0


def _one_process_per_method(args: argparse.Namespace) -> int:
    """Each method in a fresh `diffsr bench` process (its output relayed line by line), the results
    merged: memory an earlier model freed stays in a process's heap, counts in the next one's peak
    RSS and spares it page faults (S3Diff after PiSA-SR at SD size: 6.24 instead of 5.92 GiB)."""
    import subprocess
    import tempfile
    from pathlib import Path

    merged = None
    with tempfile.TemporaryDirectory(prefix="diffsr-bench-") as tmp:
        for method in args.method:
            out = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, "-m", "diffsr", "bench", "--method", method, "--size", args.size,
                   "--input", *map(str, args.input), "--dtype", args.dtype, "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats), "--json", str(out)]  # fmt: skip
            if args.device:
                cmd += ["--device", args.device]
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as child:
                for line in child.stdout:
                    print(line, end="", flush=True)
            if child.returncode != 0:
                return child.returncode
            results = json.loads(out.read_text())
            if merged is None:
                merged = results
            else:
                merged["runs"] += results["runs"]
    if args.json:
        _write_json(args.json, merged)
    return 0


def _write_json(name: str, results: dict) -> None:
    from pathlib import Path

    from ..checkpoints import atomic_write

    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
