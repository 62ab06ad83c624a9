"""Device and dtype selection. The caller chooses; we check once, at the door."""

from __future__ import annotations

import torch

from .errors import ConfigError, hint

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


CPU_ARG, FP32_ARG = 'device="cpu"', 'dtype="fp32"'  # as a Python caller writes them (errors.hint)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return a usable torch.device; None/"auto" picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r}: CUDA is not available on this machine (use {hint(CPU_ARG, '--device cpu')})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device={device!r}: MPS is not available on this machine (use {hint(CPU_ARG, '--device cpu')})"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return the compute dtype. fp16 on CPU is refused here, before any weight is loaded.

    bf16 works on CPU (slower than fp32 on most CPUs without AMX, but half the memory)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not one of fp32, fp16, bf16")
        dt = DTYPES[key]
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"dtype={dtype!r} is not one of fp32, fp16, bf16")
    if dt == torch.float16 and device.type == "cpu":
        raise ConfigError(
            f"dtype fp16 is not supported on CPU; use {hint(FP32_ARG, '--dtype fp32')} (or bf16) on CPU, "
            "fp16 on CUDA"
        )
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
