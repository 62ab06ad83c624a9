"""diffsr: real-world image super-resolution with pretrained diffusion priors.

import diffsr
up = diffsr.load("pisa", weights="pisa_sr.pkl")
out = up.upscale(image)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Upscaler", "available_methods", "load", "tune_malloc", "__version__"]


def __getattr__(name: str):
    # Lazy: `import diffsr` stays instant; torch/diffusers load on first use of the API.
    if name in ("load", "Upscaler", "available_methods"):
        from . import api

        return getattr(api, name)
    if name == "tune_malloc":
        from .allocator import tune_malloc

        return tune_malloc
    raise AttributeError(f"module 'diffsr' has no attribute {name!r}")
