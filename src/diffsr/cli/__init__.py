"""`diffsr` command line: thin layers over the Python API, one module per subcommand. Heavy
imports happen inside the commands, so `--help` and argument errors are instant."""

from __future__ import annotations

import argparse
import sys

from . import bench, degrade, eval, rtm, train, upscale, web

SUBCOMMANDS = (upscale, degrade, eval, bench, train, rtm, web)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffsr", description="Real-world image super-resolution with diffusion priors."
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"diffsr {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..errors import DiffSRError

    try:
        return args.func(args)
    except DiffSRError as e:
        print(f"diffsr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
