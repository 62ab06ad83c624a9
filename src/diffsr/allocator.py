"""The process's memory allocator, tuned for large short-lived tensors (glibc only).

By default glibc serves every block over 32 MiB with its own `mmap` and gives it back to the kernel
on `free`; freed memory at the top of the heap is also returned (trimmed). A diffusion pipeline
allocates and frees activations of tens to hundreds of MB per layer, so every layer faults fresh
pages in again: on a 2-core CPU about a third of the time went to page faults. `tune_malloc` keeps
freed blocks in the process for reuse (no per-block mmap, no trimming). Peak memory stays what the
largest working set needs (measured: README, "Speed and memory"); the memory is returned when the
process ends.

`diffsr upscale`, `diffsr web` and `diffsr bench` call it at start; DIFFSR_MALLOC=system turns it
off. Python users may call `diffsr.tune_malloc()` themselves.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
ENV = "DIFFSR_MALLOC"
_applied: bool | None = None


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (absent on musl, macOS, Windows)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc: M_MMAP_MAX 0, M_TRIM_THRESHOLD at its maximum).

    Returns True when the setting is in force; False with DIFFSR_MALLOC=system or without glibc.
    Idempotent; affects the whole process, so the library never calls it on its own."""
    global _applied
    if os.environ.get(ENV, "").strip().lower() == "system":
        return bool(_applied)
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = ok
    return ok


def mmapped_blocks() -> int | None:
    """How many blocks glibc currently serves by their own mmap (mallinfo2().hblks); None without glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]  # fmt: skip

    libc.mallinfo2.restype = Mallinfo2
    return int(libc.mallinfo2().hblks)
