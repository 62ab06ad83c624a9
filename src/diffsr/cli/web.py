"""`diffsr web`: the local web page (gradio), models loaded lazily per method."""

from __future__ import annotations

import argparse

from ._args import positive_int, quiet_libraries

METHODS = ("pisa", "s3diff", "patchscaler")


def register(sub) -> None:
    w = sub.add_parser(
        "web",
        help="start the local web page",
        description="Serve diffsr's web page (needs `pip install diffsr[web]`): upload an image, PiSA-SR with "
        "instant λ re-render, S3Diff with its degradation scores, PatchScaler with its group map; lossless "
        "PNG downloads and the CLI command of every result. Bound to 127.0.0.1 unless --host says otherwise; "
        "no share link, no analytics. Each method's model loads on its first use.",
    )
    w.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS, help="tabs (default: all)")
    w.add_argument("--weights", help="weights of the one --method (else $DIFFSR_<METHOD>_WEIGHTS)")
    w.add_argument("--base", help="SD base of the one --method (else $DIFFSR_<METHOD>_BASE or the Hub)")
    w.add_argument("--de-net", help="S3Diff's degradation estimator de_net.pth (else $DIFFSR_DE_NET)")
    w.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    w.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"))
    w.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    w.add_argument(
        "--port", type=positive_int, default=None, help="port (default: gradio's, 7860 or the next free)"
    )
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..allocator import tune_malloc
    from ..errors import ConfigError

    tune_malloc()  # freed activations stay in the process (allocator.py; DIFFSR_MALLOC=system: off)

    if (args.weights or args.base) and len(args.method) != 1:
        raise ConfigError("--weights/--base name one method's files: pass one --method with them")
    quiet_libraries()
    from ..studio import ModelPool
    from ..web import serve

    per_method = {m: {} for m in args.method}
    if len(args.method) == 1:
        per_method[args.method[0]].update(weights=args.weights, base=args.base)
    if "s3diff" in per_method:
        per_method["s3diff"]["de_net"] = args.de_net
    pool = ModelPool.from_args(args.method, device=args.device, dtype=args.dtype, per_method=per_method)
    print(
        f"diffsr web: serving {', '.join(args.method)} on http://{args.host}:{args.port or 7860} (Ctrl-C stops)"
    )
    serve(pool, host=args.host, port=args.port, block=True)
    return 0
