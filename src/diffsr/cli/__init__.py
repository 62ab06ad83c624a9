"""`diffsr` command line: thin layers over the Python API, one module per subcommand. Heavy
imports happen inside the commands, so `--help` and argument errors are instant."""

from __future__ import annotations

import argparse
import re
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


def for_cli(message: str, parser: argparse.ArgumentParser | None) -> str:
    """A library message as a shell user reads it: each Python argument of the command written
    ``name=`` (``tile_size=48``) is named by its flag (``--tile-size 48``), from the parser's table."""
    if parser is None:
        return message
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest != "help":
            message = re.sub(rf"(?<![\w.\-]){re.escape(action.dest)}=", f"{longs[0]} ", message)
    return message


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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
    from ..errors import DiffSRError, cli_messages

    try:
        with cli_messages():  # errors name flags (--max-pixels), not Python arguments
            return args.func(args)
    except DiffSRError as e:
        sub = _subparsers(parser).get(args.command)
        print(f"diffsr: error: {for_cli(str(e), sub)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
