"""`diffsr eval`: PSNR/SSIM/LPIPS/... of a folder of results, with the SR papers' conventions."""

from __future__ import annotations

import argparse
import sys

from ._args import nonneg_int, positive_int

_METRIC_NAMES = (
    "psnr, ssim, lpips, lpips-vgg, dists, fid, niqe, musiq, maniqa, maniqa-pipal, maniqa-kadid, clipiqa"
)


def register(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="measure PSNR/SSIM/LPIPS/... of results against ground truths",
        description="Evaluate the images under --pred (recursively) against those under --gt, paired by "
        "relative path without extension (pred/sub/0001.png <-> gt/sub/0001.jpg). PSNR/SSIM as BasicSR "
        "computes them (0-255, Y of BT.601, --crop-border); learned metrics through pyiqa. Prints a "
        "Markdown table (with the image count behind each mean); -o also writes metrics.csv and summary.json. "
        "Alpha is ignored; a gray image paired with an RGB one is compared as RGB. Exit status 1 if a pair "
        "failed, nothing was evaluated or a requested metric could not run; 2 for bad arguments.",
    )
    e.add_argument("--pred", required=True, metavar="DIR", help="folder of super-resolved images")
    e.add_argument("--gt", metavar="DIR", help="folder of ground-truth images (needed for reference metrics)")
    e.add_argument(
        "--metrics",
        metavar="LIST",
        help=f"comma-separated, from: {_METRIC_NAMES} (default with --gt: "
        "psnr,ssim,lpips,dists,niqe,musiq,maniqa,clipiqa; without: niqe,musiq,maniqa,clipiqa)",
    )
    e.add_argument(
        "--scale", type=positive_int, default=4, help="SR scale; the default crop border (default 4)"
    )
    e.add_argument(
        "--crop-border",
        type=nonneg_int,
        metavar="N",
        help="pixels removed per side for psnr/ssim (default: --scale)",
    )
    e.add_argument(
        "--color-space",
        choices=("y", "rgb"),
        default="y",
        help="psnr/ssim on the Y of YCbCr (default, the papers') or on RGB",
    )
    e.add_argument("--convention", choices=("basicsr", "pyiqa"), default="basicsr",
                   help="psnr/ssim as BasicSR computes them (default; 0-255 float, --crop-border, --color-space: "
                   "the PiSA-SR and S3Diff tables) or as pyiqa does (rounded Y of YCbCr, no crop: OSEDiff/SeeSR-"
                   "style tables); NIQE on the Y of YCbCr (BasicSR, MATLAB) or of YIQ (pyiqa's niqe)")  # fmt: skip
    e.add_argument("--crop-to-scale", action="store_true",
                   help="crop a ground truth that is up to --scale-1 pixels larger than its prediction (an HR "
                   "whose size is not a multiple of the scale) to the prediction's size, top-left")  # fmt: skip
    e.add_argument("--niqe-params", metavar="FILE",
                   help="NIQE's pristine model: BasicSR's niqe_pris_params.npz or the MATLAB release's "
                   "modelparameters.mat (default: $DIFFSR_NIQE_PARAMS, an installed BasicSR, pyiqa's cache)")  # fmt: skip
    e.add_argument("-o", "--output", metavar="REPORT_DIR", help="write metrics.csv and summary.json here")
    e.add_argument(
        "--device",
        default=None,
        help="device for pyiqa metrics: cpu, cuda, cuda:N (default: cuda if available)",
    )
    e.add_argument(
        "--max-pixels", type=positive_int, default=1 << 24, help="refuse images above this many pixels"
    )
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    if args.metrics is not None:
        from ..metrics import parse_metrics

        metrics = parse_metrics(args.metrics, args.gt is not None)  # bad names fail before any import
    else:
        metrics = None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # pyiqa fetches some weights from the Hub
    from tqdm import tqdm

    from ..metrics import evaluate

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    crop = args.scale if args.crop_border is None else args.crop_border
    report = evaluate(
        args.pred,
        args.gt,
        metrics,
        crop_border=crop,
        color_space=args.color_space,
        convention=args.convention,
        crop_to_scale=args.scale if args.crop_to_scale else None,
        niqe_params=args.niqe_params,
        device=args.device,
        max_pixels=args.max_pixels,
        progress=not args.quiet,
        log=log,
    )
    report.settings["scale"] = args.scale

    err = sys.stderr
    for side, label in (("pred", args.pred), ("gt", args.gt)):
        names = report.unmatched.get(side, [])
        if names:
            other = "ground truth" if side == "pred" else "prediction"
            print(f"{len(names)} unmatched in {label} (no {other} with that path):", file=err)
            for n in names:
                print(f"  {n}", file=err)
    for note in report.notes:
        print(f"note: {note}", file=err)

    if report.count or report.set_values:
        print(report.markdown(), end="")
    if args.output:
        paths = report.write(args.output)
        if not args.quiet:
            print(f"wrote {paths['csv']} and {paths['json']}", file=err)

    parts = [f"{report.count} evaluated"]
    if report.failed:
        parts.append(f"{len(report.failed)} failed")
    n_unmatched = sum(len(v) for v in report.unmatched.values())
    if n_unmatched:
        parts.append(f"{n_unmatched} unmatched")
    if report.unavailable:
        parts.append(f"unavailable: {', '.join(report.unavailable)}")
    print(", ".join(parts), file=err)
    for key, reason in report.failed.items():
        print(f"  failed: {key}: {reason}", file=err)

    if report.failed:
        return 1
    if report.count == 0 and not report.set_values:
        where = Path(args.pred) if args.gt is None else f"{args.pred} and {args.gt}"
        print(f"diffsr: no image pairs to evaluate in {where}", file=err)
        return 1
    if report.all_unavailable:
        print("diffsr: none of the requested metrics could run", file=err)
        return 1
    if report.unavailable:  # the table lacks a requested column: not a success
        print(f"diffsr: unavailable: {', '.join(report.unavailable)} (see the notes above)", file=err)
        return 1
    return 0
