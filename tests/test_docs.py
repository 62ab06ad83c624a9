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


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch, tiny_sd_dir, pisa_dir, s3diff_dir):
    """README's Python blocks, in order and in one namespace, run as written with tiny stand-ins:
    the weight files and photo become the test's, CUDA/fp16 become CPU/fp32, bases come from env."""
    import numpy as np
    import torch
    from PIL import Image

    from diffsr.methods.s3diff import DegradationEstimator

    Image.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "photo.jpg"
    )
    torch.save(DegradationEstimator().state_dict(), tmp_path / "de_net.pth")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSR_PISA_BASE", str(tiny_sd_dir))
    monkeypatch.setenv("DIFFSR_S3DIFF_BASE", str(tiny_sd_dir))
    monkeypatch.setenv("DIFFSR_S3DIFF_WEIGHTS", str(s3diff_dir))  # the Hub download, already made
    swaps = {'"pisa_sr.pkl"': repr(str(pisa_dir)), '"cuda"': '"cpu"', '"fp16"': '"fp32"'}
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    ns: dict = {}
    for block in blocks:
        for a, b in swaps.items():
            block = block.replace(a, b)
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - the documentation's own code
    assert ns["out"].size == (80, 96)  # the last line: S3Diff x4 of the 20x24 photo
    assert ns["a"].size == ns["b"].size == (80, 96)
    assert set(ns["info"]["estimated"]) == {"blur", "noise"}


def test_readme_options_table_covers_every_upscale_flag():
    from diffsr.cli import _subparsers

    table = "\n".join(
        line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `-")
    )
    upscale = _subparsers(build_parser())["upscale"]
    flags = [o for a in upscale._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert len(flags) > 20
    assert [f for f in flags if f not in table] == []
