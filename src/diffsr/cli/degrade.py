"""`diffsr degrade`: make LR/HR pair sets from HR images (Real-ESRGAN degradations or bicubic)."""

from __future__ import annotations

import argparse
import sys

from ._args import positive_int


def register(sub) -> None:
    d = sub.add_parser(
        "degrade",
        help="make an LR/HR pair set from HR images",
        description="Writes OUT/hr/<name>.png (the HR, cropped to a multiple of the scale), OUT/lr/<name>.png "
        "(1/scale) and OUT/params.jsonl (each image's sampled degradation). Presets: pisa (PiSA-SR's "
        "Real-ESRGAN parameters), s3diff (S3Diff's milder ones), bicubic (plain bicubic downscale). The same "
        "--seed gives byte-identical files.",
    )
    d.add_argument("inputs", nargs="+", metavar="HR", help="HR image files or folders (recursive)")
    d.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    d.add_argument("--preset", default="pisa", choices=("pisa", "s3diff", "bicubic"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=positive_int, default=4)
    d.add_argument("--device", default="cpu", help="where degradations run (default cpu)")
    d.add_argument("--overwrite", action="store_true", help="rewrite existing pairs")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import find_images
    from ..pairs import make_pairs

    total = len(find_images(args.inputs))
    bar = tqdm(total=total, unit="img", disable=args.quiet)

    def progress(key: str) -> None:
        bar.set_postfix_str(key, refresh=False)
        bar.update(1)

    report = make_pairs(args.inputs, args.output, preset=args.preset, seed=args.seed, scale=args.scale,
                        device=args.device, overwrite=args.overwrite, progress=progress)  # fmt: skip
    bar.close()
    for msg in report.failed.values():
        print(f"error: {msg}", file=sys.stderr)
    print(f"{len(report.written)} written, {len(report.skipped)} skipped (exist), {len(report.failed)} failed",
          file=sys.stderr)  # fmt: skip
    return 1 if report.failed else 0
