"""Registry of SR methods. Entries are import paths so that listing methods imports no model code."""

from __future__ import annotations

import importlib

from ..errors import ConfigError

METHODS: dict[str, str] = {
    "pisa": "diffsr.methods.pisa:PiSASR",
    "s3diff": "diffsr.methods.s3diff:S3Diff",
    "patchscaler": "diffsr.methods.patchscaler.model:PatchScaler",
}


def get_method(name: str):
    """The class implementing method `name` (imported on first use)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
