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
    "--val-pairs": ("val_pairs", str),
    "--pair-scale": ("pair_scale", int),
    "--lpips-weights": ("lpips_weights", str),
    "--log-with": ("log_with", str),
    "--degradation": ("degradation", str),
    "--crop-size": ("crop_size", int),
}
_PISA = {"--pix-steps": ("pix_steps", int), "--sem-steps": ("sem_steps", int)}
_S3DIFF = {"--de-net": ("de_net", str), "--disc-weights": ("disc_weights", str)}
_PATCHSCALER = {"--rtm": ("rtm", str), "--grm-steps": ("grm_steps", int), "--dit-preset": ("dit_preset", str)}


def register(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train PiSA-SR or S3Diff (resumable; multi-GPU with accelerate launch)",
        description="Train a method on HQ images with on-the-fly Real-ESRGAN degradations (--data) or on real "
        "LR/HR pairs (--pairs). Settings come from "
        "the method's defaults (the authors'), then --config FILE (JSON or TOML), then the flags below, then "
        "--set KEY=VALUE. The run folder gets config.json, checkpoints/step-N (every --checkpoint-every, last "
        "--keep-last kept), logs, validation images, and final/ (load it with diffsr upscale --weights). "
        "Several GPUs or nodes: accelerate launch -m diffsr train ... (see docs/training.md).",
    )
    methods = t.add_subparsers(dest="train_method", metavar="METHOD", required=True)
    for name, extra in (("pisa", _PISA), ("s3diff", _S3DIFF), ("patchscaler", _PATCHSCALER)):
        m = methods.add_parser(name, help=f"train {name}")
        m.add_argument(
            "--data",
            action="append",
            metavar="DIR_OR_LIST",
            help="HQ images: folder or list file (repeatable)",
        )
        m.add_argument("--pairs", action="append", metavar="DIR_OR_LIST",
                       help="real LR/HR pairs instead of --data: a folder with lr/ and hr/ (as diffsr degrade "
                       "writes) or a list file of 'LR HR' lines (repeatable)")  # fmt: skip
        m.add_argument("-o", "--output", metavar="RUN_DIR", help="run folder")
        m.add_argument("--config", metavar="FILE", help="settings file (JSON or TOML)")
        m.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="any setting (repeatable)"
        )
        m.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the run folder's last checkpoint, or from the CHECKPOINT folder given")  # fmt: skip
        m.add_argument("--gradient-checkpointing", action="store_true", default=None)
        for flag, (_, tp) in {**_COMMON, **extra}.items():
            m.add_argument(flag, type=tp)
        m.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
        m.set_defaults(func=run, flag_map={**_COMMON, **extra})
    tc = methods.add_parser(
        "texture-classifier", help="train PatchScaler's texture classifier on VAE latents"
    )
    src = tc.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", metavar="DIR", help="one sub-folder of images per texture class (e.g. DTD's images/)"
    )
    src.add_argument("--procedural", action="store_true", help="procedural textures (no dataset needed)")
    tc.add_argument("-o", "--output", required=True, metavar="DIR")
    tc.add_argument("--base", help="SD base for the VAE")
    tc.add_argument("--steps", type=int, default=2000)
    tc.add_argument("--batch-size", type=int, default=32)
    tc.add_argument("--lr", type=float, default=1e-3)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--device", default=None)
    tc.set_defaults(func=run_texture)


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
    if args.pairs:
        flags["pairs"] = args.pairs
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
    from ..train.loop import TrainingStopped, build_trainer, run_training

    try:
        out = run_training(
            build_trainer(cfg), resume=args.resume, log=lambda s: print(s, file=sys.stderr, flush=True)
        )
    except TrainingStopped as e:
        print(f"diffsr: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM
    print(out)
    return 0


def run_texture(args: argparse.Namespace) -> int:
    from ._args import quiet_libraries

    quiet_libraries()
    from ..devices import resolve_device
    from ..methods.patchscaler.model import DEFAULT_BASE, ENV_BASE
    from ..sd import load_sd_parts, resolve_base
    from ..train.texture import train_texture_classifier

    vae = load_sd_parts(resolve_base(args.base, default=DEFAULT_BASE, env=ENV_BASE), device=resolve_device(args.device),
                        text_encoder=False).vae  # fmt: skip
    model, classes, acc = train_texture_classifier(
        vae, data=args.data, procedural=args.procedural, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, log=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    model.save(args.output)
    print(f"{args.output}: {len(classes)} classes, held-out batch accuracy {acc:.3f}", file=sys.stderr)
    return 0
