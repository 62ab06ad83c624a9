"""The documentation keeps its promises: every `diffsr ...` command in README.md and docs/*.md parses
with today's command line (no stale flag or subcommand), `accelerate launch ... -m diffsr ...` and
`torchrun ... -m diffsr ...` included, and every repository path the docs name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from diffsr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(path: Path) -> list[str]:
    """Each diffsr invocation in the file's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in _bash_blocks(path.read_text()):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in line.split("&&"):
                part = part.split("#", 1)[0].strip()
                if not part:
                    continue
                words = shlex.split(part)
                if any(w.startswith("[") for w in words):  # a usage synopsis, not a command
                    continue
                if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["diffsr"]:
                    out.append(shlex.join(words[words.index("-m") + 2 :]))
                elif words[0] == "diffsr":
                    out.append(shlex.join(words[1:]))
    return out


COMMANDS = [(p.name, c) for p in DOCS for c in _commands(p)]


def test_docs_have_commands():
    assert len(COMMANDS) > 15 and {name for name, _ in COMMANDS} >= {"README.md", "training.md"}


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:40]}" for d, c in COMMANDS])
def test_every_documented_command_parses(doc, command):
    parser = build_parser()
    try:
        args = parser.parse_args(shlex.split(command))
    except SystemExit as e:  # argparse's error exit
        pytest.fail(f"{doc}: `diffsr {command}` does not parse (exit {e.code})")
    assert getattr(args, "func", None) is not None, f"{doc}: `diffsr {command}` names no subcommand"
    if hasattr(args, "flag_map"):  # a training command: its --set keys are settings of that method
        from diffsr.train.config import CONFIGS

        fields = set(CONFIGS[args.train_method].__dataclass_fields__)
        unknown = [k for k in (i.partition("=")[0].replace("-", "_") for i in args.set) if k not in fields]
        assert not unknown, f"{doc}: `diffsr {command}` sets unknown settings {unknown}"


def test_repository_paths_named_in_docs_exist():
    missing = []
    for p in DOCS:
        text = p.read_text()
        for m in re.finditer(r"(?<![\w/.])((?:docs|benchmarks|tests|src|\.ci)/[\w./-]+\w)", text):
            if not (ROOT / m.group(1)).exists():
                missing.append(f"{p.name}: {m.group(1)}")
    assert not missing, missing
