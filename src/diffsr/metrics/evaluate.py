"""Evaluate a folder of super-resolved images, optionally against a folder of ground truths.

Pairing is by *key*: the path relative to the folder, without the extension (``sub/0001`` for
``pred/sub/0001.png`` and ``gt/sub/0001.jpg``). Files whose key has no partner are listed as
unmatched, never paired by position; two files with one key on one side (``a.png`` and
``a.jpg``) make that key fail as ambiguous.

Metrics:

* ``psnr``, ``ssim``: :mod:`diffsr.metrics.psnr_ssim` (BasicSR's definitions, float64), on the
  0-255 scale, with ``crop_border`` and on the Y channel (``color_space="y"``) or RGB;
* ``lpips`` (AlexNet), ``lpips-vgg``, ``dists``: full-reference, through pyiqa;
* ``niqe``: no-reference, :mod:`diffsr.metrics.niqe` (the MATLAB release's algorithm, float64), on
  the Y of YCbCr (``convention="basicsr"``, as BasicSR) or of YIQ (``"pyiqa"``, as pyiqa's ``niqe``);
  its pristine model is read from ``niqe_params`` or found by :func:`~diffsr.metrics.niqe.find_niqe_params`;
* ``musiq``, ``maniqa``, ``clipiqa``: no-reference, through pyiqa, on the prediction;
* ``fid``: one value for the two folders, pyiqa's FID of the prediction folder against the
  ground-truth folder (pyiqa lists and reads the folders itself, so every image file in them
  counts, matched or not).

pyiqa metrics get float32 ``(1, 3, H, W)`` tensors in ``[0, 1]`` (gray repeated to 3 channels).
A pyiqa metric whose weights or package cannot be had is reported as *unavailable* (with the
reason) and the others still run. A pair that cannot be evaluated (unreadable file, size or
channel mismatch, a metric raising on it) is reported as *failed* and left out of every mean,
so all per-image means are over the same images.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffsr.errors import ConfigError, DiffSRError, ImageError, hint
from diffsr.io import DEFAULT_MAX_PIXELS, ImageData, find_images, read_image

from .niqe import NiqeParams, find_niqe_params, load_niqe_params, niqe
from .psnr_ssim import psnr, ssim

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
    "pair_folders",
    "parse_metrics",
]

METRICS: tuple[str, ...] = (
    "psnr",
    "ssim",
    "lpips",
    "lpips-vgg",
    "dists",
    "fid",
    "niqe",
    "musiq",
    "maniqa",
    "maniqa-pipal",
    "maniqa-kadid",
    "clipiqa",
)
"""Every metric name `evaluate` knows (also the CLI names and the CSV column names)."""

PIXEL_METRICS: tuple[str, ...] = ("psnr", "ssim")
PYIQA_NAMES: dict[str, str] = {
    "lpips": "lpips",
    "lpips-vgg": "lpips-vgg",
    "dists": "dists",
    "fid": "fid",
    "musiq": "musiq",
    "maniqa": "maniqa",
    "maniqa-pipal": "maniqa-pipal",
    "maniqa-kadid": "maniqa-kadid",
    "clipiqa": "clipiqa",
}
"""diffsr metric name -> the pyiqa ``create_metric`` name it runs. MANIQA has one model per training set
(KonIQ-10k, PIPAL, KADID-10k); plain ``maniqa`` is whatever the installed pyiqa defaults to (KonIQ in
pyiqa 0.1.16), and the table names the training set of the one that ran."""

FULL_REFERENCE = frozenset({"psnr", "ssim", "lpips", "lpips-vgg", "dists"})
SET_METRICS = frozenset({"fid"})  # one value for the whole folder pair; needs the gt folder
NO_REFERENCE = frozenset({"niqe", "musiq", "maniqa", "maniqa-pipal", "maniqa-kadid", "clipiqa"})
LOWER_BETTER: dict[str, bool] = {
    "psnr": False,
    "ssim": False,
    "lpips": True,
    "lpips-vgg": True,
    "dists": True,
    "fid": True,
    "niqe": True,
    "musiq": False,
    "maniqa": False,
    "maniqa-pipal": False,
    "maniqa-kadid": False,
    "clipiqa": False,
}
"""Direction of each metric (pyiqa's ``lower_better`` replaces it for a metric that loads)."""

DEFAULT_FR_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa")
DEFAULT_NR_METRICS: tuple[str, ...] = ("niqe", "musiq", "maniqa", "clipiqa")
LPIPS_NETS = {"lpips": "alex", "lpips-vgg": "vgg"}
INSTALL_HINT = "pip install diffsr[metrics]"
_WEIGHTS_HINT = (
    "its weights could not be loaded; pyiqa downloads them on first use, which needs network access once"
)


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def _reason(e: BaseException) -> str:
    msg = _one_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------------------------
# metric names


def parse_metrics(metrics: str | Sequence[str] | None, has_gt: bool) -> list[str]:
    """Validate metric names (a comma-separated string or a sequence) and return them in order.

    None: :data:`DEFAULT_FR_METRICS` with a ground truth, :data:`DEFAULT_NR_METRICS` without.
    Duplicates are dropped. Unknown names, or reference metrics without a ground truth, raise
    ConfigError.
    """
    if metrics is None:
        return list(DEFAULT_FR_METRICS if has_gt else DEFAULT_NR_METRICS)
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name and name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"no metric given; choose from {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not has_gt:
        need = [n for n in names if n in FULL_REFERENCE or n in SET_METRICS]
        if need:
            raise ConfigError(
                f"{', '.join(need)} need(s) a ground-truth folder ({hint('gt_dir', '--gt')}); "
                f"without one only {', '.join(DEFAULT_NR_METRICS)} can run"
            )
    return names


# --------------------------------------------------------------------------------------------
# pairing


@dataclass
class Pairing:
    """Result of :func:`pair_folders`.

    ``pairs``: ``(key, pred_path, gt_path or None)`` sorted by key. ``unmatched``: paths
    relative to their folder, extension included. ``ambiguous``: key -> reason.
    """

    pairs: list[tuple[str, Path, Path | None]]
    unmatched: dict[str, list[str]]
    ambiguous: dict[str, str]
    notes: list[str] = field(default_factory=list)


def _index(folder: Path, what: str) -> tuple[dict[str, list[Path]], int]:
    if not folder.exists():
        raise ConfigError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"{what} folder {folder} is not a folder")
    found: dict[str, list[Path]] = {}
    n = 0
    for path, rel in find_images([folder]):
        found.setdefault(rel.as_posix(), []).append(path)
        n += 1
    return found, n


def pair_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike | None = None) -> Pairing:
    """Pair the image files of two folders by relative path without extension, recursively.

    Without ``gt_dir`` every prediction is returned with ``None`` as its partner. Hidden files
    and folders are skipped. Raises ConfigError when a folder does not exist.
    """
    pred_root = Path(pred_dir)
    pred, _ = _index(pred_root, "prediction")
    gt: dict[str, list[Path]] = {}
    if gt_dir is not None:
        gt_root = Path(gt_dir)
        gt, _ = _index(gt_root, "ground-truth")

    ambiguous: dict[str, str] = {}
    for side, index in (("prediction", pred), ("ground truth", gt)):
        for key, paths in index.items():
            if len(paths) > 1:
                names = " and ".join(str(p) for p in paths)
                ambiguous[key] = f"ambiguous {side} key {key!r}: {names} (rename one)"

    def rel(root: Path, p: Path) -> str:
        return p.relative_to(root).as_posix()

    pairs: list[tuple[str, Path, Path | None]] = []
    unmatched: dict[str, list[str]] = {"pred": [], "gt": []}
    for key in sorted(pred):
        if key in ambiguous:
            continue
        if gt_dir is None:
            pairs.append((key, pred[key][0], None))
        elif key in gt:
            pairs.append((key, pred[key][0], gt[key][0]))
        else:
            unmatched["pred"].append(rel(pred_root, pred[key][0]))
    if gt_dir is not None:
        for key in sorted(gt):
            if key not in pred and key not in ambiguous:
                unmatched["gt"].extend(rel(gt_root, p) for p in gt[key])

    notes: list[str] = []
    if gt_dir is not None and not pairs and unmatched["pred"] and unmatched["gt"]:
        # Do not guess: report that the layouts differ.
        gt_names = {Path(k).name: k for k in gt}
        same = [(k, gt_names[Path(k).name]) for k in sorted(pred) if Path(k).name in gt_names]
        if same:
            p, g = same[0]
            notes.append(
                f"no relative path matches, but {len(same)} file name(s) match when folders are "
                f"ignored (e.g. {p!r} and {g!r}); pairing is by relative path, so nothing was "
                "paired: give both folders the same layout"
            )
    return Pairing(pairs, unmatched, ambiguous, notes)


# --------------------------------------------------------------------------------------------
# the report


def _fmt_cell(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _json_number(v: float | None) -> float | str | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else repr(v)  # strict JSON has no inf/nan: "inf", "-inf", "nan"


def _write_atomic(path: Path, text: str) -> None:
    from ..checkpoints import atomic_write

    try:
        atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8", newline=""))
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the report ({_one_line(e)})") from e


@dataclass
class EvalReport:
    """What :func:`evaluate` measured.

    ``metrics``: the requested names in order. ``rows``: ``(key, {metric: value})`` for every
    evaluated image, in key order (failed pairs are not rows). ``set_values``: set-level
    metrics (``fid``). ``unmatched``: ``{"pred": [...], "gt": [...]}`` relative paths.
    ``failed``: key -> one-line reason. ``unavailable``: metric -> one-line reason.
    """

    metrics: list[str]
    rows: list[tuple[str, dict[str, float]]]
    set_values: dict[str, float]
    unmatched: dict[str, list[str]]
    failed: dict[str, str]
    unavailable: dict[str, str]
    lower_better: dict[str, bool]
    settings: dict[str, Any]
    versions: dict[str, str | None]
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Images evaluated (pairs with a ground truth)."""
        return len(self.rows)

    @property
    def all_unavailable(self) -> bool:
        return bool(self.metrics) and all(m in self.unavailable for m in self.metrics)

    @property
    def mean(self) -> dict[str, float | None]:
        """Per metric: the mean over the rows, the folder value for ``fid``, None if unavailable."""
        out: dict[str, float | None] = {}
        for m in self.metrics:
            if m in self.unavailable:
                out[m] = None
            elif m in SET_METRICS:
                out[m] = self.set_values.get(m)
            else:
                vals = [v[m] for _, v in self.rows if m in v]
                out[m] = float(np.mean(np.asarray(vals, dtype=np.float64))) if vals else None
        return out

    def to_csv(self) -> str:
        """``image`` (the key) then one column per metric; a last row ``mean``."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", *self.metrics])
        for key, values in self.rows:
            w.writerow([key, *(_fmt_cell(values.get(m)) for m in self.metrics)])
        mean = self.mean
        w.writerow(["mean", *(_fmt_cell(mean[m]) for m in self.metrics)])
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        """The content of summary.json (non-finite numbers as the strings "inf", "-inf", "nan")."""
        return {
            "mean": {m: _json_number(v) for m, v in self.mean.items()},
            "count": self.count,
            "unmatched": {
                "pred": list(self.unmatched.get("pred", [])),
                "gt": list(self.unmatched.get("gt", [])),
            },
            "failed": dict(self.failed),
            "unavailable": dict(self.unavailable),
            "counts": self.counts(),
            "lower_better": {m: self.lower_better[m] for m in self.metrics},
            "settings": self.settings,
            "versions": self.versions,
        }

    def counts(self) -> dict[str, int]:
        """How many images each mean is over (a set metric: the pairs it was computed on)."""
        out = {}
        for m in self.metrics:
            if m in SET_METRICS:
                out[m] = int(self.settings.get("set_metric_pairs", 0)) if m in self.set_values else 0
            else:
                out[m] = sum(1 for _, v in self.rows if m in v)
        return out

    def markdown(self) -> str:
        """A ``| metric | value | images |`` table, names with ↑ (higher is better) or ↓; psnr/ssim
        carry their convention (basicsr: Y/RGB and the crop; pyiqa: its Y and no crop), niqe its channel."""
        lines = ["| metric | value | images |", "|:-------|------:|-------:|"]
        mean = self.mean
        counts = self.counts()
        conv = self.settings.get("convention", "basicsr")
        if conv == "pyiqa":
            tag = " (pyiqa: Y of YCbCr, no crop)"
        else:
            space = "Y" if self.settings.get("test_y_channel", True) else "RGB"
            tag = f" (basicsr: {space}, crop {self.settings.get('crop_border', 0)})"
        for m in self.metrics:
            arrow = "↓" if self.lower_better.get(m, LOWER_BETTER[m]) else "↑"
            v = mean[m]
            if m in self.unavailable:
                cell = "unavailable"
            elif v is None:
                cell = "n/a"
            elif not math.isfinite(v):
                cell = repr(v)
            else:
                cell = f"{v:.2f}" if m == "psnr" else f"{v:.4f}"
            variant = (self.settings.get("pyiqa_training_sets") or {}).get(m)
            if m == "niqe":
                variant = "Y of YIQ, as pyiqa" if conv == "pyiqa" else "Y of YCbCr, as MATLAB"
            label = f"{m}{tag}" if m in PIXEL_METRICS else (f"{m} ({variant})" if variant else m)
            lines.append(f"| {label} {arrow} | {cell} | {counts[m]} |")
        return "\n".join(lines) + "\n"

    def write(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``metrics.csv`` and ``summary.json`` into ``folder`` (created), atomically."""
        out = Path(folder)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{out}: cannot create the report folder ({_one_line(e)})") from e
        csv_path, json_path = out / "metrics.csv", out / "summary.json"
        _write_atomic(csv_path, self.to_csv())
        _write_atomic(
            json_path, json.dumps(self.summary(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        )
        return {"csv": csv_path, "json": json_path}


# --------------------------------------------------------------------------------------------
# evaluation


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    from diffsr import __version__

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    v: dict[str, str | None] = {
        "diffsr": __version__,
        "numpy": np.__version__,
        "torch": version("torch"),
        "python": platform.python_version(),
    }
    pyiqa = version("pyiqa")
    if pyiqa is not None:
        v["pyiqa"] = pyiqa
    return v


def _to_255(img: ImageData) -> np.ndarray:
    """0-255 float64 pixels. The file's integer codes are recovered exactly (read_image stores
    them as float32 fractions), so 8-bit values are integers and 16-bit ones are x / 65535 * 255."""
    p = img.pixels.astype(np.float64)
    if img.bit_depth == 16:
        return np.rint(p * 65535.0) / 65535.0 * 255.0
    return np.rint(p * 255.0)


def _training_sets(names: list[str]) -> dict[str, str]:
    """The dataset each named learned metric was trained on, from pyiqa's own model table."""
    try:
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
    except ImportError:
        return {}
    out = {}
    for n in names:
        ds = DEFAULT_CONFIGS.get(PYIQA_NAMES[n], {}).get("metric_opts", {}).get("train_dataset")
        if ds:
            out[n] = str(ds)
    return out


def _as_rgb(img: ImageData) -> ImageData:
    """Gray replicated to three channels (alpha dropped: metrics compare colour channels)."""
    px = np.repeat(img.pixels, 3, axis=-1) if img.pixels.shape[-1] == 1 else img.pixels
    return ImageData(px, None, img.bit_depth, img.format)


def _pyiqa_pixel_metrics(names: list[str]) -> dict[str, Any]:
    """pyiqa's PSNR / SSIM as OSEDiff / SeeSR-style evaluations create them: on the Y channel of
    YCbCr (rounded to integer levels by pyiqa), no border crop. No weights are involved."""
    if not names:
        return {}
    try:
        import pyiqa
    except ImportError:
        raise ConfigError(
            f"{hint('convention=pyiqa', '--convention pyiqa')} needs pyiqa: pip install diffsr[metrics]"
        ) from None
    return {n: pyiqa.create_metric(n, test_y_channel=True, color_space="ycbcr", device="cpu", as_loss=False)
            for n in names}  # fmt: skip


def _fid_on_pairs(model, pairs: list[tuple[Path, Path]]) -> float:
    """FID between exactly the paired predictions and ground truths (not whatever else the folders
    hold): the files are linked (or copied) into two temporary folders for pyiqa."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="diffsr-fid-") as tmp:
        dirs = [Path(tmp) / "pred", Path(tmp) / "gt"]
        for d in dirs:
            d.mkdir()
        for i, pair in enumerate(pairs):
            for d, src in zip(dirs, pair, strict=True):
                dst = d / f"{i:06d}{src.suffix.lower()}"
                try:
                    os.symlink(src.resolve(), dst)
                except OSError:
                    shutil.copyfile(src, dst)
        return _as_float(model(str(dirs[0]), str(dirs[1]), verbose=False))


def _to_tensor(img: ImageData, device):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img.pixels.transpose(2, 0, 1)))[None]
    if t.shape[1] == 1:
        t = t.repeat(1, 3, 1, 1)
    return t.to(device)


def _as_float(out: Any) -> float:
    if hasattr(out, "detach"):
        out = out.detach().float().cpu().numpy()
    return float(np.asarray(out, dtype=np.float64).reshape(-1)[0])


def _load_pyiqa(
    names: list[str], device, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, str]]:
    models: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    if not names:
        return models, unavailable
    try:
        import pyiqa
    except ImportError as e:
        if getattr(e, "name", None) == "pyiqa":
            reason = f"pyiqa is not installed ({INSTALL_HINT})"
        else:
            reason = f"pyiqa cannot be imported ({_reason(e)}; {INSTALL_HINT})"
        return models, {n: reason for n in names}
    except Exception as e:  # a broken install must not stop psnr/ssim
        return models, {n: f"pyiqa cannot be imported ({_reason(e)})" for n in names}
    for name in names:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # pyiqa prints "Downloading: ..." on stdout
                models[name] = pyiqa.create_metric(PYIQA_NAMES[name], device=device, as_loss=False)
        except (OSError, ImportError) as e:
            unavailable[name] = f"{_reason(e)} ({_WEIGHTS_HINT})"
        except Exception as e:
            unavailable[name] = _reason(e)
        if name in unavailable:
            log(f"{name}: unavailable: {unavailable[name]}")
    return models, unavailable


def evaluate(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike | None = None,
    metrics: str | Sequence[str] | None = None,
    *,
    crop_border: int = 4,
    color_space: str = "y",
    convention: str = "basicsr",
    crop_to_scale: int | None = None,
    niqe_params: str | os.PathLike | NiqeParams | None = None,
    device: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate the images of ``pred_dir`` (recursively) against those of ``gt_dir``.

    ``metrics``: names from :data:`METRICS` (comma-separated string or sequence); None picks
    :data:`DEFAULT_FR_METRICS` with ``gt_dir`` and :data:`DEFAULT_NR_METRICS` without.
    ``crop_border``: pixels removed per side for psnr/ssim (the SR papers use the scale).
    ``color_space``: ``"y"`` (BT.601 luma, the papers' convention) or ``"rgb"``, for psnr/ssim.
    ``convention``: ``"basicsr"`` (the above: float64 on 0-255, ``crop_border``, as BasicSR and the
    PiSA-SR / S3Diff tables) or ``"pyiqa"`` (pyiqa's psnr/ssim on the rounded Y of YCbCr, no crop,
    as OSEDiff / SeeSR-style tables compute them; ``crop_border`` and ``color_space`` unused).
    ``crop_to_scale``: a ground truth larger than its prediction by less than this many pixels per
    side (an HR whose size is not a multiple of the scale) is cropped to the prediction's size from
    the top-left, as BasicSR's mod-crop does; None: sizes must match.
    Pairs: alpha is ignored (the colour channels are compared); a gray image paired with an RGB one
    is compared as RGB (the gray replicated). FID uses exactly the paired files.
    ``niqe_params``: NIQE's pristine model, a file (BasicSR's ``niqe_pris_params.npz`` or the MATLAB
    release's ``modelparameters.mat``) or loaded :class:`~diffsr.metrics.niqe.NiqeParams`; None looks
    for one (``$DIFFSR_NIQE_PARAMS``, an installed BasicSR, pyiqa's cache) and reports NIQE as
    unavailable when there is none. NIQE follows ``convention`` (Y of YCbCr, or pyiqa's Y of YIQ)
    and never crops.
    ``device``: for the pyiqa metrics (None: CUDA when available). ``max_pixels``: passed to
    read_image. ``progress``: a tqdm bar on stderr. ``log``: called with one-line notes
    (unavailable metric, failed pair) as they happen.

    Raises ConfigError for bad arguments (unknown metric, reference metric without ``gt_dir``,
    missing folder, unusable device). Problems with single files do not raise: they end up in
    ``EvalReport.failed``; metrics that cannot load end up in ``EvalReport.unavailable``.
    """
    log = log or (lambda msg: None)
    names = parse_metrics(metrics, gt_dir is not None)
    if color_space not in ("y", "rgb"):
        raise ConfigError(f"color_space must be 'y' or 'rgb', got {color_space!r}")
    if isinstance(crop_border, bool) or int(crop_border) != crop_border or crop_border < 0:
        raise ConfigError(f"crop_border must be an integer >= 0, got {crop_border!r}")
    crop_border = int(crop_border)
    test_y = color_space == "y"
    if convention not in ("basicsr", "pyiqa"):
        raise ConfigError(f"convention must be 'basicsr' or 'pyiqa', got {convention!r}")

    pairing = pair_folders(pred_dir, gt_dir)
    iqa_names = [n for n in names if n in PYIQA_NAMES]
    dev = None
    if iqa_names:
        from diffsr.devices import resolve_device

        dev = resolve_device(device)
    device_str = str(dev) if dev is not None else "cpu"

    models, unavailable = _load_pyiqa(iqa_names, dev, log)
    niqe_model: NiqeParams | None = None
    if "niqe" in names:
        if isinstance(niqe_params, NiqeParams):
            niqe_model = niqe_params
        elif niqe_params is not None:
            niqe_model = load_niqe_params(niqe_params)  # a file the caller named must be usable
        else:
            try:
                niqe_model = find_niqe_params()
            except ConfigError as e:
                unavailable["niqe"] = str(e)
                log(f"niqe: unavailable: {e}")
    niqe_space = "yiq" if convention == "pyiqa" else "ycbcr"
    if convention == "pyiqa":
        pixel_fns = _pyiqa_pixel_metrics([n for n in names if n in PIXEL_METRICS])
    else:
        pixel_fns = None
    lower_better = dict(LOWER_BETTER)
    for n, model in models.items():
        lb = getattr(model, "lower_better", None)
        if isinstance(lb, bool):
            lower_better[n] = lb

    failed: dict[str, str] = dict(pairing.ambiguous)
    for reason in pairing.ambiguous.values():
        log(f"failed: {reason}")
    pixel = [n for n in names if n in PIXEL_METRICS]
    per_image_iqa = [n for n in iqa_names if n not in SET_METRICS and n in models]
    used: set[str] = set()  # pyiqa metrics that have produced a value at least once
    rows: list[tuple[str, dict[str, float]]] = []

    pairs = pairing.pairs
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(pairs, unit="img", dynamic_ncols=True, desc="eval")
        iterator = bar
    else:
        iterator = pairs
    for key, pred_path, gt_path in iterator:
        if bar is not None:
            bar.set_postfix_str(key, refresh=False)
        try:
            values = _evaluate_pair(
                pred_path,
                gt_path,
                pixel=pixel,
                iqa=per_image_iqa,
                models=models,
                unavailable=unavailable,
                used=used,
                crop_border=crop_border,
                test_y=test_y,
                device=dev,
                max_pixels=max_pixels,
                log=log,
                pixel_fns=pixel_fns,
                crop_to_scale=crop_to_scale,
                niqe_model=niqe_model,
                niqe_space=niqe_space,
            )
        except KeyboardInterrupt:
            raise
        except DiffSRError as e:
            failed[key] = _one_line(e)
            log(f"failed: {failed[key]}")
            continue
        except Exception as e:
            failed[key] = f"{pred_path}: {_reason(e)}"
            log(f"failed: {failed[key]}")
            continue
        rows.append((key, values))
    if bar is not None:
        bar.close()
    # a metric that went unavailable on its first call contributes nothing
    rows = [(k, {m: v for m, v in vals.items() if m not in unavailable}) for k, vals in rows]

    set_values: dict[str, float] = {}
    fid_pairs = [(p, g) for k, p, g in pairs if g is not None and k not in failed]
    if "fid" in names and "fid" in models:
        if len(fid_pairs) < 2:
            unavailable["fid"] = f"needs at least 2 image pairs, got {len(fid_pairs)}"
        else:
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    set_values["fid"] = _fid_on_pairs(models["fid"], fid_pairs)
            except Exception as e:
                unavailable["fid"] = _reason(e) + (
                    f" ({_WEIGHTS_HINT})" if isinstance(e, (OSError, ImportError)) else ""
                )
        if "fid" in unavailable:
            log(f"fid: unavailable: {unavailable['fid']}")

    settings = {
        "pred_dir": os.fspath(pred_dir),
        "gt_dir": None if gt_dir is None else os.fspath(gt_dir),
        "metrics": names,
        "convention": convention,
        "crop_border": 0 if convention == "pyiqa" else crop_border,
        "color_space": "y" if convention == "pyiqa" else color_space,
        "test_y_channel": True if convention == "pyiqa" else test_y,
        "crop_to_scale": crop_to_scale,
        "set_metric_pairs": len(fid_pairs),
        "lpips_variant": {n: LPIPS_NETS[n] for n in names if n in LPIPS_NETS} or None,
        "niqe": {"color_space": niqe_space, "params": niqe_model.source} if niqe_model is not None else None,
        "pyiqa_metric_names": {n: PYIQA_NAMES[n] for n in iqa_names},
        "pyiqa_training_sets": _training_sets([n for n in iqa_names if n.startswith("maniqa")]) or None,
        "device": device_str,
    }
    return EvalReport(
        metrics=names,
        rows=rows,
        set_values=set_values,
        unmatched=pairing.unmatched,
        failed=failed,
        unavailable={m: unavailable[m] for m in names if m in unavailable},
        lower_better={m: lower_better[m] for m in names},
        settings=settings,
        versions=_versions(),
        notes=list(pairing.notes),
    )


def _evaluate_pair(
    pred_path: Path,
    gt_path: Path | None,
    *,
    pixel: list[str],
    iqa: list[str],
    models: dict[str, Any],
    unavailable: dict[str, str],
    used: set[str],
    crop_border: int,
    test_y: bool,
    device,
    max_pixels: int | None,
    log: Callable[[str], None],
    pixel_fns: dict[str, Any] | None = None,
    crop_to_scale: int | None = None,
    niqe_model: NiqeParams | None = None,
    niqe_space: str = "ycbcr",
) -> dict[str, float]:
    pred = read_image(pred_path, max_pixels=max_pixels)
    gt = read_image(gt_path, max_pixels=max_pixels) if gt_path is not None else None
    if gt is not None:
        dh, dw = gt.height - pred.height, gt.width - pred.width
        if crop_to_scale and 0 <= dh < crop_to_scale and 0 <= dw < crop_to_scale and (dh or dw):
            gt = ImageData(gt.pixels[: pred.height, : pred.width], None, gt.bit_depth, gt.format)
        if (pred.height, pred.width) != (gt.height, gt.width):
            tip = (
                f" ({hint('crop_to_scale=SCALE', '--crop-to-scale')} crops an HR that is not a multiple of the scale)"
                if dh >= 0 and dw >= 0
                else ""
            )
            raise ImageError(
                f"size mismatch: {pred_path} is {pred.width}x{pred.height}, {gt_path} is {gt.width}x{gt.height}{tip}"
            )
        if pred.channels != gt.channels:  # gray vs RGB: compared as RGB
            pred, gt = _as_rgb(pred), _as_rgb(gt)
    values: dict[str, float] = {}
    if pixel:
        assert gt is not None
        a, b = _to_255(pred), _to_255(gt)
        # pyiqa's convention: both images as tensors once per pair, for every pixel metric
        ta, tb = (_to_tensor(pred, "cpu"), _to_tensor(gt, "cpu")) if pixel_fns is not None else (None, None)
        for name in pixel:
            fn = psnr if name == "psnr" else ssim
            try:
                if pixel_fns is not None:
                    import torch

                    with torch.no_grad():
                        values[name] = _as_float(pixel_fns[name](ta, tb))
                    continue
                values[name] = fn(a, b, crop_border=crop_border, test_y_channel=test_y)
            except ConfigError as e:
                msg = str(e).split(": ", 1)[-1]
                raise ImageError(f"{pred_path} vs {gt_path}: {name}: {msg}") from e
    if niqe_model is not None:
        try:
            values["niqe"] = niqe(_to_255(pred), niqe_model, color_space=niqe_space)
        except ConfigError as e:  # e.g. smaller than one 96x96 block
            raise ImageError(f"{pred_path}: niqe: {e}") from e
    active = [n for n in iqa if n not in unavailable]
    if active:
        import torch

        with torch.no_grad():
            x = _to_tensor(pred, device)
            y = _to_tensor(gt, device) if gt is not None else None
            for name in active:
                try:
                    with contextlib.redirect_stdout(sys.stderr):  # lazy weight downloads print too
                        out = models[name](x, y) if name in FULL_REFERENCE else models[name](x)
                    values[name] = _as_float(out)
                    used.add(name)
                except (OSError, ImportError) as e:
                    if name in used:  # it worked before: this pair is the problem
                        raise ImageError(f"{pred_path}: {name}: {_reason(e)}") from e
                    unavailable[name] = f"{_reason(e)} ({_WEIGHTS_HINT})"  # lazy weights, first call
                    log(f"{name}: unavailable: {unavailable[name]}")
                except Exception as e:
                    where = f"{pred_path}" + (
                        f" vs {gt_path}" if gt_path is not None and name in FULL_REFERENCE else ""
                    )
                    raise ImageError(f"{where}: {name}: {_reason(e)}") from e
    return values
