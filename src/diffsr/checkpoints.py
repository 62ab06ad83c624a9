"""Checkpoint files: safe reading of the authors' pickles and diffsr's own folder format.

diffsr format: a folder with `config.json` (hyperparameters, method name, format version) and
`model.safetensors` (tensors). Written atomically, file by file (temp name + rename).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError, WeightsNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def safe_torch_load(path: str | os.PathLike) -> object:
    """torch.load with weights_only=True on CPU: plain containers and tensors only.

    A pickle that asks to import or call anything else is refused with CheckpointError; nothing
    in it runs."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        asks = f"it asks for {found.group(1)}" if found else str(e).strip().splitlines()[0][:120]
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors and containers, and loading "
            f"it could run code ({asks})"
        ) from None
    except Exception as e:  # truncated/corrupt archives raise RuntimeError, EOFError, zipfile errors, …
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:160]})"
        ) from None


def _umask() -> int:
    """The process's umask: read from /proc where Linux offers it (os.umask would change it for a moment,
    which other threads could see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Create `path` atomically: `write(tmp_path)` fills a temporary file in the same folder, which is
    fsynced and renamed over `path`; on any error the temporary file is removed and `path` untouched."""
    from .io import tmp_stem

    fd, tmp = tempfile.mkstemp(prefix=f".{tmp_stem(path.name)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and writers that replace the file) give 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_folder(folder: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `config` (JSON-able dict) and `tensors` to `folder` in diffsr's format."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"format_version": FORMAT_VERSION, **config}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return folder


def is_diffsr_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def load_folder(
    folder: str | os.PathLike, *, method: str | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (config, tensors) from a diffsr folder; check the method name when given."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_diffsr_folder(folder):
        raise WeightsNotFoundError(
            f"{folder}: not a diffsr weights folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: unreadable config ({e})") from None
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder}: format version {cfg['format_version']} is newer than this diffsr; upgrade"
        )
    if method is not None and cfg.get("method") != method:
        raise CheckpointError(f"{folder}: holds weights for method {cfg.get('method')!r}, not {method!r}")
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except Exception as e:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: unreadable safetensors file ({e})") from None
    return cfg, tensors


def config_to_dict(method: str, config) -> dict:
    """A method's frozen config dataclass as the JSON-able dict stored in config.json."""
    import dataclasses

    return {"method": method, **dataclasses.asdict(config)}


def config_from_dict(cls, data: dict, what: str):
    """The inverse of config_to_dict: unknown keys are an error; JSON lists become tuples where the
    field is declared a tuple (frozen dataclasses compare and hash by value)."""
    import dataclasses

    data = {k: v for k, v in data.items() if k not in ("method", "format_version")}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise CheckpointError(f"{what} config has unknown fields: {', '.join(sorted(unknown))}")
    for k, v in data.items():
        if isinstance(v, list) and str(fields[k].type).startswith("tuple"):
            data[k] = tuple(v)
    return cls(**data)
