"""Typed errors. Every message is one line that names the thing (file, argument, model) and the fix."""

from __future__ import annotations


class DiffSRError(Exception):
    """Base class of every error diffsr raises on purpose."""


class ImageError(DiffSRError):
    """An image file or array cannot be read, is too large, or cannot be written."""


class WeightsNotFoundError(DiffSRError):
    """Base model or method weights are missing (not cached, no network, wrong path)."""


class CheckpointError(DiffSRError):
    """A checkpoint exists but is malformed, unsafe, or does not fit the model."""


class ConfigError(DiffSRError, ValueError):
    """An argument or configuration value is invalid."""
