"""`diffsr build-rtm`: build PatchScaler's reference texture memory from HQ images."""

from __future__ import annotations

import argparse
import sys

from ._args import positive_int, quiet_libraries


def register(sub) -> None:
    b = sub.add_parser(
        "build-rtm",
        help="build PatchScaler's reference texture memory (offline, deterministic)",
        description="Random textured HR crops (128x128 px, near-flat ones rejected) → SD-VAE latents (RTM values) → "
        "keys from the frozen texture classifier → farthest point sampling over the normalised keys, from --pool "
        "candidates (paper: 20,000) to --size pairs (paper: 2,000). Writes OUT/classifier and OUT/rtm.",
    )
    b.add_argument(
        "inputs", nargs="+", metavar="HQ", help="HQ images or folders (paper: DIV2K, OST, Manga109)"
    )
    b.add_argument("-o", "--output", required=True, metavar="OUT")
    b.add_argument("--classifier", required=True, metavar="DIR",
                   help="a texture classifier folder (diffsr train texture-classifier)")  # fmt: skip
    b.add_argument("--base", help="SD base for the VAE (default stabilityai/stable-diffusion-2-1-base)")
    b.add_argument("--pool", type=positive_int, default=20000)
    b.add_argument("--size", type=positive_int, default=2000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default=None)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    import torch

    from ..devices import resolve_device
    from ..io import find_images, read_image
    from ..methods.patchscaler.memory import build_texture_memory, save_texture_memory
    from ..methods.patchscaler.model import DEFAULT_BASE, ENV_BASE
    from ..methods.patchscaler.texture import TextureClassifier
    from ..sd import load_sd_parts, resolve_base

    device = resolve_device(args.device)
    vae = load_sd_parts(resolve_base(args.base, default=DEFAULT_BASE, env=ENV_BASE), device=device,
                        text_encoder=False).vae  # fmt: skip
    classifier = TextureClassifier.load(args.classifier).to(device).eval()

    def images():
        for src, _ in find_images(args.inputs):
            px = read_image(src, max_pixels=None).pixels
            t = torch.from_numpy(px.transpose(2, 0, 1).copy())
            yield t.repeat(3, 1, 1) if t.shape[0] == 1 else t

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rtm = build_texture_memory(
        images(), vae, classifier, pool=args.pool, size=args.size, seed=args.seed, log=log
    )
    save_texture_memory(args.output, classifier, rtm)
    log(f"wrote {args.output}: {len(rtm)} (key, value) pairs")
    return 0
