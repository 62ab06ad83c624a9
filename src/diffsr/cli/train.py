"""`diffsr train METHOD`: train or fine-tune a method (one process, or many under `accelerate launch`)."""

from __future__ import annotations

import argparse
import sys

# command-line flags that set a config field directly: flag → (field, type)
_COMMON = {
    "--base": ("base", str),
    "--init-weights": ("init_weights", str),
    "--max-steps": ("max_steps", int),
    "--batch-size": ("batch_size", int),
    "--grad-accum": ("grad_accum", int),
    "--lr": ("learning_rate", float),
    "--mixed-precision": ("mixed_precision", str),
    "--seed": ("seed", int),
    "--checkpoint-every": ("checkpoint_every", int),
    "--keep-last": ("keep_last", int),
    "--validate-every": ("validate_every", int),
    "--val-data": ("val_data", str),
    "--log-with": ("log_with", str),
    "--degradation": ("degradation", str),
    "--crop-size": ("crop_size", int),
}
_PISA = {"--pix-steps": ("pix_steps", int), "--sem-steps": ("sem_steps", int)}
_S3DIFF = {"--de-net": ("de_net", str)}


def register(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train PiSA-SR or S3Diff (resumable; multi-GPU with accelerate launch)",
        description="Train a method on HQ images with on-the-fly Real-ESRGAN degradations. Settings come from "
        "the method's defaults (the authors'), then --config FILE (JSON or TOML), then the flags below, then "
        "--set KEY=VALUE. The run folder gets config.json, checkpoints/step-N (every --checkpoint-every, last "
        "--keep-last kept), logs, validation images, and final/ (load it with diffsr upscale --weights). "
        "Several GPUs or nodes: accelerate launch -m diffsr train ... (see docs/training.md).",
    )
    methods = t.add_subparsers(dest="train_method", metavar="METHOD", required=True)
    for name, extra in (("pisa", _PISA), ("s3diff", _S3DIFF)):
        m = methods.add_parser(name, help=f"train {name}")
        m.add_argument(
            "--data",
            action="append",
            metavar="DIR_OR_LIST",
            help="HQ images: folder or list file (repeatable)",
        )
        m.add_argument("-o", "--output", metavar="RUN_DIR", help="run folder")
        m.add_argument("--config", metavar="FILE", help="settings file (JSON or TOML)")
        m.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting (repeatable)"
        )
        m.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        m.add_argument("--gradient-checkpointing", action="store_true", default=None)
        for flag, (_, tp) in {**_COMMON, **extra}.items():
            m.add_argument(flag, type=tp)
        m.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
        m.set_defaults(func=run, flag_map={**_COMMON, **extra})


def resolve(args: argparse.Namespace):
    """The typed config from defaults, file, flags and --set (and, on --resume, the run's config.json)."""
    import json
    from pathlib import Path

    from ..train.config import build_config, parse_overrides, read_config_file

    layers = []
    if args.resume and args.output and (Path(args.output) / "config.json").is_file():
        layers.append(json.loads((Path(args.output) / "config.json").read_text()))
    if args.config:
        layers.append(read_config_file(args.config))
    flags = {}
    if args.data:
        flags["data"] = args.data
    if args.output:
        flags["output_dir"] = args.output
    if args.gradient_checkpointing:
        flags["gradient_checkpointing"] = True
    for flag, (field, _) in args.flag_map.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            flags[field] = value
    layers.append(flags)
    layers.append(parse_overrides(args.set))
    return build_config(args.train_method, *layers)


def run(args: argparse.Namespace) -> int:
    import json

    from ._args import quiet_libraries

    cfg = resolve(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    quiet_libraries()
    from ..train.loop import build_trainer, run_training

    out = run_training(
        build_trainer(cfg), resume=args.resume, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    print(out)
    return 0
