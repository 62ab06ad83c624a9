"""Argument types and helpers shared by the subcommands (no heavy imports here)."""

from __future__ import annotations

import argparse
import logging
import math
import os


def _bounded(kind: type, lo: float | None = None, hi: float | None = None, *, strict_lo: bool = False):
    """An argparse type: `kind` parsed from the string and checked against [lo, hi] (or (lo, hi])."""

    def parse(s: str):
        v = kind(s)
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if (lo is not None and (v <= lo if strict_lo else v < lo)) or (hi is not None and v > hi):
            rng = f"{'(' if strict_lo else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {rng}, got {s}")
        return v

    return parse


positive_float = _bounded(float, 0, strict_lo=True)
nonneg_float = _bounded(float, 0)
unit_float = _bounded(float, 0, 1)
positive_int = _bounded(int, 1)
nonneg_int = _bounded(int, 0)


def quiet_libraries() -> None:
    """diffusers/transformers/huggingface_hub print load-time progress bars and notes; the CLI has its own."""

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers", "transformers", "huggingface_hub", "peft", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging tweaks are best effort
        pass
