"""Typed errors. Every message is one line that names the thing (file, argument, model) and the fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


# --------------------------------------------------------------------------------------------
# who reads the message: a Python caller or a shell user


_for_cli = False


def hint(api: str, cli: str) -> str:
    """An option named as the reader of an error knows it: ``api`` (the Python argument, e.g.
    ``"max_pixels="``) for library callers, ``cli`` (the flag, e.g. ``"--max-pixels"``) while a
    ``diffsr`` command runs (see :func:`cli_messages`). Messages are built when raised, so they
    come out right in the command's worker threads too."""
    return cli if _for_cli else api


@contextmanager
def cli_messages() -> Iterator[None]:
    """Within this block (the ``diffsr`` command line), :func:`hint` names flags, not arguments."""
    global _for_cli
    before, _for_cli = _for_cli, True
    try:
        yield
    finally:
        _for_cli = before
