"""Image-quality evaluation with the super-resolution papers' conventions.

``psnr``/``ssim`` follow BasicSR (0-255 scale, Y of BT.601, ``crop_border``, 11x11 Gaussian
SSIM on the valid region) in float64 NumPy; the learned and statistical metrics (LPIPS, DISTS,
FID, NIQE, MUSIQ, MANIQA, CLIPIQA) run through pyiqa, imported only when asked for.

    from diffsr.metrics import evaluate
    report = evaluate("results/pisa", "datasets/DIV2K_val/HR", metrics="psnr,ssim,lpips")
    print(report.markdown())
    report.write("results/eval-pisa")
"""

from __future__ import annotations

from .evaluate import (
    DEFAULT_FR_METRICS,
    DEFAULT_NR_METRICS,
    FULL_REFERENCE,
    LOWER_BETTER,
    METRICS,
    NO_REFERENCE,
    PYIQA_NAMES,
    SET_METRICS,
    EvalReport,
    Pairing,
    evaluate,
    pair_folders,
    parse_metrics,
)
from .psnr_ssim import gaussian_kernel, psnr, rgb_to_y, ssim

__all__ = [
    "DEFAULT_FR_METRICS",
    "DEFAULT_NR_METRICS",
    "FULL_REFERENCE",
    "LOWER_BETTER",
    "METRICS",
    "NO_REFERENCE",
    "PYIQA_NAMES",
    "SET_METRICS",
    "EvalReport",
    "Pairing",
    "evaluate",
    "gaussian_kernel",
    "pair_folders",
    "parse_metrics",
    "psnr",
    "rgb_to_y",
    "ssim",
]
