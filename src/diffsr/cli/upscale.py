"""`diffsr upscale`: super-resolve files and folders."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path, PurePath

from ._args import nonneg_float, nonneg_int, positive_float, positive_int, quiet_libraries, unit_float

METHOD_CHOICES = ("pisa", "s3diff", "patchscaler")
# method-specific options: CLI dest → (method, API keyword)
METHOD_OPTIONS = {
    "lambda_pix": ("pisa", "lambda_pix"),
    "lambda_sem": ("pisa", "lambda_sem"),
    "blur": ("s3diff", "blur"),
    "noise": ("s3diff", "noise"),
    "guidance_scale": ("s3diff", "guidance_scale"),
    "group_devices": ("patchscaler", "devices"),
    "unified": ("patchscaler", "unified"),
}


def group_devices(s: str) -> dict:
    out = {}
    for part in s.split(","):
        group, sep, dev = part.partition("=")
        if not sep or group not in ("simple", "medium", "hard") or not dev:
            raise argparse.ArgumentTypeError(
                f"expected GROUP=DEVICE pairs with GROUP in simple/medium/hard, got {part!r}"
            )
        out[group] = dev
    return out


def register(sub) -> None:
    u = sub.add_parser(
        "upscale",
        help="super-resolve images (files or folders, recursively)",
        description="Super-resolve images ×4 (or --outscale). Outputs mirror the input tree under OUTDIR; "
        "existing outputs are skipped unless --overwrite. Exit status 1 if any image failed.",
    )
    u.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    u.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    u.add_argument("--method", default="pisa", choices=METHOD_CHOICES, help="SR method (default: pisa)")
    u.add_argument(
        "--base",
        metavar="ID_OR_DIR",
        help="Stable Diffusion base: Hub id or local diffusers folder "
        "(default: the method's; env DIFFSR_<METHOD>_BASE)",
    )
    u.add_argument(
        "--weights",
        metavar="PATH",
        help="method weights: the authors' checkpoint or a diffsr folder (env DIFFSR_<METHOD>_WEIGHTS)",
    )
    g = u.add_argument_group("PiSA-SR")
    g.add_argument("--lambda-pix", type=nonneg_float, help="pixel-level guidance λ_pix (default 1)")
    g.add_argument("--lambda-sem", type=nonneg_float, help="semantic-level guidance λ_sem (default 1)")
    g = u.add_argument_group("S3Diff")
    g.add_argument(
        "--de-net", metavar="PATH", help="the degradation estimator de_net.pth (env DIFFSR_DE_NET)"
    )
    g.add_argument("--blur", type=unit_float, help="override the estimated blur score (0..1)")
    g.add_argument("--noise", type=unit_float, help="override the estimated noise score (0..1)")
    g.add_argument("--guidance-scale", type=nonneg_float, help="CFG scale (default 1.07)")
    g = u.add_argument_group("PatchScaler")
    g.add_argument("--group-devices", type=group_devices, metavar="GROUP=DEV,...",
                   help="run the sampling groups on several devices, e.g. hard=cuda:0,simple=cuda:1,medium=cuda:1 "
                   "(the paper's two-GPU split)")  # fmt: skip
    g.add_argument("--unified", action="store_true", default=None,
                   help="no grouping: every patch 20 steps from t=1000 (the baseline PGS speeds up)")  # fmt: skip
    o = u.add_argument_group("output")
    o.add_argument("--outscale", type=positive_float, help="final scale (Lanczos after the native ×4)")
    o.add_argument(
        "--ext",
        default="png",
        help="output extension (png, jpg, webp, tif, bmp) or 'input' to keep the "
        "input's format (default png; images with alpha are always written as png unless the format keeps alpha)",
    )
    o.add_argument("--suffix", default="", help="added to each output name before the extension, e.g. _sr "
                   "(needed to write next to the inputs: -o on the input folder)")  # fmt: skip
    o.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    o.add_argument(
        "--color-fix", choices=("adain", "wavelet", "none"), help="colour correction (default: the method's)"
    )
    t = u.add_argument_group("tiling")
    t.add_argument("--tile-size", type=positive_int, default=96, help="latent tile size (default 96)")
    t.add_argument("--tile-overlap", type=nonneg_int, default=32, help="latent tile overlap (default 32)")
    t.add_argument(
        "--tile-batch", type=positive_int, default=4, help="latent tiles per UNet call (default 4)"
    )
    t.add_argument(
        "--vae-encoder-tile", type=positive_int, default=512, help="VAE encoder tile, pixels (default 512)"
    )
    t.add_argument(
        "--vae-decoder-tile", type=positive_int, default=64, help="VAE decoder tile, latent px (default 64)"
    )
    t.add_argument(
        "--vae-offload",
        choices=("auto", "none", "cpu", "disk"),
        default="auto",
        help="where tiled-VAE activations wait between layers: auto (cpu on a GPU, disk on the CPU), "
        "none (the device: fastest, memory grows with the image), cpu (host memory), disk (a temporary "
        "file under $TMPDIR)",
    )
    r = u.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="compute precision (default fp32)"
    )
    r.add_argument(
        "--seed", type=int, help="seed for --sample-posterior (PatchScaler: its noise map, default 0)"
    )
    r.add_argument(
        "--sample-posterior",
        action="store_true",
        help="sample the VAE posterior as the authors' code does (default: its mode, deterministic)",
    )
    r.add_argument(
        "--max-pixels", type=positive_int, default=1 << 24, help="refuse inputs above this many pixels"
    )
    r.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="PiSA-SR, S3Diff: run up to N images of one size through the model together, for a "
                   "GPU (on a CPU it is slower). Inputs are grouped by size; a group's last batch is padded, so "
                   "each result depends on its image alone; vs N=1 results agree to float rounding. Default 1")  # fmt: skip
    r.add_argument("--no-io-overlap", action="store_true",
                   help="read and write images on the main thread (default: the next image is decoded and "
                   "finished ones are encoded on background threads while the model works)")  # fmt: skip
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("-v", "--verbose", action="store_true", help="print per-image details")
    u.set_defaults(func=run)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return "(" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + ")"
    return str(v)


def run(args: argparse.Namespace) -> int:
    from ..allocator import tune_malloc
    from ..errors import DiffSRError
    from ..io import find_images, output_path, probe_alpha

    tune_malloc()  # freed activations stay in the process (allocator.py; DIFFSR_MALLOC=system: off)
    method_opts = {}
    for dest, (method, key) in METHOD_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if method != args.method:
            flag = "--" + dest.replace("_", "-")
            print(f"diffsr: error: {flag} applies to --method {method}, not {args.method}", file=sys.stderr)
            return 2
        method_opts[key] = value
    if args.tile_overlap >= args.tile_size:
        print(f"diffsr: error: --tile-overlap {args.tile_overlap} must be smaller than --tile-size {args.tile_size}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.batch_size > 1 and args.method not in ("pisa", "s3diff"):
        print(
            f"diffsr: error: --batch-size applies to --method pisa or s3diff, not {args.method}",
            file=sys.stderr,
        )
        return 2
    if args.de_net and args.method != "s3diff":
        print(f"diffsr: error: --de-net applies to --method s3diff, not {args.method}", file=sys.stderr)
        return 2

    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        print(f"diffsr: error: -o {outdir}: is a file, not a folder", file=sys.stderr)
        return 2
    # -o inside an input folder: what is in -o (earlier outputs) is never taken as input, unless named
    out_res = outdir.resolve()
    named = {Path(i).resolve() for i in args.inputs if Path(i).is_file()}
    nested = any(out_res != r and out_res.is_relative_to(r) for r in (Path(i).resolve() for i in args.inputs
                                                                     if Path(i).is_dir()))  # fmt: skip
    jobs = []
    for src, rel in find_images(args.inputs):
        if nested and src.resolve().is_relative_to(out_res) and src.resolve() not in named:
            continue
        jobs.append((src, rel))
    if not jobs:
        print("diffsr: no images found in the given inputs", file=sys.stderr)
        return 1
    ext = None if args.ext == "png" else args.ext
    bad = _check_devices(method_opts.get("devices"), args.device)
    if bad:
        print(f"diffsr: error: {bad}", file=sys.stderr)
        return 2
    claimed: dict[Path, Path] = {}
    entries: list[tuple[Path, PurePath, Path, str | None]] = []  # every input, in order, with its problem
    planned = []
    for src, rel in jobs:
        try:  # the name the result will really get (alpha never goes to JPEG), read from the header
            planned.append((src, rel, output_path(outdir, rel, src, ext=ext, has_alpha=probe_alpha(src),
                                                  suffix=args.suffix)))  # fmt: skip
        except DiffSRError as e:
            print(f"diffsr: error: {e}", file=sys.stderr)
            return 2
    # -o on an input folder with --suffix: an earlier run's outputs (a_sr.png for a.png) are not inputs
    outputs = {dst.resolve() for _, _, dst in planned}
    planned = [(s, r, d) for s, r, d in planned
               if not (s.resolve() in outputs and s.resolve() not in named and d.resolve() != s.resolve())]  # fmt: skip
    inputs = {src.resolve() for src, _, _ in planned}
    for src, rel, dst in planned:
        problem = None
        if dst.resolve() in inputs:
            problem = f"{src}: the output would replace an input (use --suffix or another -o)"
        elif dst in claimed:  # a.png and a.jpg in one folder would write the same file
            problem = f"{src}: output {dst} is already taken by {claimed[dst]} (use --ext input)"
        else:
            claimed[dst] = src
        entries.append((src, rel, dst, problem))

    # several processes (accelerate launch / torchrun): input i belongs to process i mod N, whatever
    # exists already, so every process agrees on the split and a restarted run resumes by skipping
    shard = _Shard.from_env(args.device)
    mine = entries[shard.rank :: shard.world]
    failed: list[tuple[Path, str]] = [(src, problem) for src, _, _, problem in mine if problem]
    todo, skipped = [], 0
    for src, rel, dst, problem in mine:
        if problem:
            continue
        if dst.exists() and not args.overwrite:
            skipped += 1
            if args.verbose:
                print(f"{dst}: exists, skipped (--overwrite to replace)", file=sys.stderr)
            continue
        todo.append((src, rel))
    for _, msg in failed:
        print(f"error: {msg}", file=sys.stderr)
    if not todo and shard.world == 1:
        if not failed:
            print(
                f"diffsr: all {skipped} outputs exist; nothing to do (--overwrite to replace)",
                file=sys.stderr,
            )
        return 1 if failed else 0

    written = 0
    interrupted = False
    total = shard.total(len(todo))  # every process takes part, even one with nothing to do
    if todo:
        quiet_libraries()
        from ..api import load

        t0 = time.perf_counter()
        extra = {"de_net": args.de_net} if args.method == "s3diff" else {}
        up = load(args.method, weights=args.weights, base=args.base, device=shard.device or args.device,
                  dtype=args.dtype, **extra)  # fmt: skip
        if args.verbose:
            print(f"loaded {up!r} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        options = dict(
            color_fix=args.color_fix,
            tile_size=args.tile_size,
            tile_overlap=args.tile_overlap,
            tile_batch=args.tile_batch,
            vae_encoder_tile=args.vae_encoder_tile,
            vae_decoder_tile=args.vae_decoder_tile,
            vae_offload=args.vae_offload,
            sample_posterior=args.sample_posterior,
            seed=args.seed,
        )
        options.update(method_opts)
        options = {k: v for k, v in options.items() if v is not None}  # unset: the method's own default
        written, interrupted = _process(args, up, todo, outdir, ext, options, failed, shard, total)
    if interrupted:
        print(f"diffsr: interrupted; {written} written, {len(failed)} failed", file=sys.stderr)
        return 130
    written, skipped, failed = shard.gather(written, skipped, failed)
    if shard.rank != 0:
        return 1 if failed else 0
    summary = f"{written} written, {skipped} skipped (exist), {len(failed)} failed"
    if shard.world > 1:
        summary += f" ({shard.world} processes)"
    print(summary, file=sys.stderr)
    if failed:
        for src, msg in failed:
            print(f"  failed: {msg if str(src) in msg else f'{src}: {msg}'}", file=sys.stderr)
        return 1
    return 0


def _process(args, up, todo, outdir, ext, options, failed, shard, total: int) -> tuple[int, bool]:
    """Upscale `todo` (in order; with --batch-size N > 1 in order of size, N images of one size at a
    time); the next N images are read and the finished ones written on background threads while the
    model works (unless --no-io-overlap), with at most 2N results waiting for the writer. Returns
    (written, interrupted); failures are appended to `failed`."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from ..errors import DiffSRError
    from ..io import output_path, read_image, write_image

    overlap = not args.no_io_overlap
    reader = ThreadPoolExecutor(1, thread_name_prefix="diffsr-read") if overlap else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="diffsr-write") if overlap else None
    bar = tqdm(total=total, unit="img", disable=args.quiet or shard.rank != 0, dynamic_ncols=True)
    tile_bar = None
    written = 0
    pending: deque = deque()  # (src, future of the write)

    def progress(ev: dict) -> None:
        nonlocal tile_bar
        if args.quiet or shard.rank != 0 or ev.get("total", 1) <= 1:
            return
        if tile_bar is None:
            tile_bar = tqdm(total=ev["total"], unit=ev.get("unit", "tile"), leave=False, position=1,
                            dynamic_ncols=True)  # fmt: skip
        tile_bar.n = ev["done"]
        tile_bar.refresh()

    def read(src):
        return read_image(src, max_pixels=args.max_pixels)

    def record(src, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, DiffSRError) else f"{src}: {type(exc).__name__}: {exc}"
        failed.append((src, msg))
        tqdm.write(f"error: {msg}", file=sys.stderr)

    def settle(at_most: int) -> None:
        """Count the writes that have finished, oldest first; wait for the oldest while more than
        `at_most` are pending (so results waiting to be written stay bounded when the disk is slower
        than the model)."""
        nonlocal written
        while pending and (len(pending) > at_most or pending[0][1].done()):
            src, fut = pending.popleft()
            try:
                fut.result()
                written += 1
            except Exception as e:
                record(src, e)
            shard.count_done(bar)

    n = args.batch_size

    def run_batch(batch: list) -> None:
        """Upscale `batch` [(src, rel, ImageData)] (one image, or up to n of one size) and queue the writes."""
        nonlocal tile_bar, written
        t = time.perf_counter()
        try:
            if n == 1:
                results = [up.process(batch[0][2], outscale=args.outscale, progress=progress, **options)]
            else:
                results = up.process_batch([b[2] for b in batch], batch_size=n, outscale=args.outscale,
                                           progress=progress, **options)  # fmt: skip
        except KeyboardInterrupt:
            raise
        except Exception as e:  # a broken image must not end the run
            for src, _, _ in batch:
                record(src, e)
                shard.count_done(bar)
            return
        finally:
            if tile_bar is not None:
                tile_bar.close()
                tile_bar = None
        seconds = time.perf_counter() - t
        for (src, rel, _), (out, info) in zip(batch, results, strict=True):
            try:
                dst = output_path(
                    outdir, rel, src, ext=ext, has_alpha=out.alpha is not None, suffix=args.suffix
                )
                if args.verbose:
                    details = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items())
                    took = f"{seconds:.1f} s" + (f" for a batch of {len(batch)}" if n > 1 else "")
                    tqdm.write(f"{src} -> {dst} ({out.pixels.shape[1]}x{out.pixels.shape[0]}, "
                               f"{took}; {details})", file=sys.stderr)  # fmt: skip
                if writer:
                    pending.append((src, writer.submit(write_image, dst, out, overwrite=args.overwrite)))
                else:
                    write_image(dst, out, overwrite=args.overwrite)
                    written += 1
                    shard.count_done(bar)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                record(src, e)
                shard.count_done(bar)
        settle(at_most=2 * n)

    # batches hold images of one size: with n > 1 the inputs are taken in order of their size (read
    # from the file headers), so each size's images come together; at most n are read ahead
    order = todo if n == 1 else sorted(todo, key=lambda job: (_header_size(job[0]), str(job[0])))
    previous = _sigterm_as_interrupt()  # a killed batch stops like Ctrl-C: no temporary file left behind
    reads: deque = deque()  # futures of the reads submitted ahead, in order
    submitted = 0

    def read_ahead(upto: int) -> None:
        """Keep the reads of order[:upto] submitted to the reader thread."""
        nonlocal submitted
        while reader and submitted < min(upto, len(order)):
            reads.append(reader.submit(read, order[submitted][0]))
            submitted += 1

    try:
        batch: list = []
        for i, (src, rel) in enumerate(order):
            bar.set_postfix_str(str(rel), refresh=False)
            read_ahead(i + n + 1)  # the next n images (a whole batch) decode while this one runs
            try:
                img = reads.popleft().result() if reader else read(src)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                img = e
            if isinstance(img, BaseException):
                record(src, img)
                shard.count_done(bar)
                continue
            if batch and batch[-1][2].pixels.shape[:2] != img.pixels.shape[:2]:
                run_batch(batch)
                batch = []
            batch.append((src, rel, img))
            if len(batch) == n:
                run_batch(batch)
                batch = []
        if batch:
            run_batch(batch)
        settle(at_most=0)
        shard.wait_bar(bar)
    except KeyboardInterrupt:
        for ex in (reader, writer):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)  # a write under way finishes (atomically)
        bar.close()
        return written, True
    finally:
        _restore_sigterm(previous)
        for ex in (reader, writer):
            if ex is not None:
                ex.shutdown(wait=True)
    bar.close()
    return written, False


class _Shard:
    """This process's place among the processes of an `accelerate launch` / `torchrun` run (one process:
    rank 0 of 1, and nothing is initialised). The processes count finished images in the process group's
    key-value store, so rank 0's bar shows the whole run, and exchange their results at the end."""

    def __init__(self, rank: int = 0, world: int = 1, device=None, store=None):
        self.rank, self.world, self.device, self.store = rank, world, device, store

    @classmethod
    def from_env(cls, device: str | None) -> _Shard:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        store = None
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        except Exception:  # no shared counter: rank 0's bar then counts its own share
            store = None
        return cls(state.process_index, state.num_processes, device or str(state.device), store)

    def total(self, mine: int) -> int:
        if self.world == 1:
            return mine
        import torch
        import torch.distributed as dist

        t = torch.tensor([mine], dtype=torch.int64, device=self.device)  # NCCL needs it on the GPU
        dist.all_reduce(t)
        return int(t.item())

    def count_done(self, bar) -> None:
        if self.store is not None:
            done = self.store.add("diffsr_upscale_done", 1)
            if self.rank == 0:
                bar.n = done
                bar.refresh()
        else:
            bar.update(1)

    def wait_bar(self, bar) -> None:
        """Rank 0 keeps its bar moving until every process has finished its share."""
        if self.store is None or self.rank != 0 or bar.disable:
            return
        while True:
            done = self.store.add("diffsr_upscale_done", 0)
            bar.n = done
            bar.refresh()
            if done >= bar.total:
                return
            time.sleep(0.2)

    def gather(self, written: int, skipped: int, failed: list) -> tuple[int, int, list]:
        """Totals over every process (each process gets them, so all exit with the same status)."""
        if self.world == 1:
            return written, skipped, failed
        from accelerate.utils import gather_object

        parts = gather_object([(written, skipped, [(str(s), m) for s, m in failed])])
        return (sum(p[0] for p in parts), sum(p[1] for p in parts),
                [(Path(s), m) for p in parts for s, m in p[2]])  # fmt: skip


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; (0, 0) when it cannot be read (the
    read itself then reports the problem)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return (0, 0)


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), so a killed batch unwinds the same way: the
    image being written is abandoned with its temporary file removed. Returns the previous handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _check_devices(devices: dict | None, default: str | None) -> str | None:
    """A one-line complaint about a device named by --group-devices (or --device) that this machine
    lacks, before any model is loaded; None when all exist."""
    import torch

    names = [d for d in [default, *(devices or {}).values()] if d]
    for name in names:
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            return f"device {name!r} is not a device name (cpu, cuda, cuda:N, mps)"
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                return f"device {name!r}: no CUDA device on this machine"
            if dev.index is not None and dev.index >= n:
                return f"device {name!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
        elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return f"device {name!r}: MPS is not available"
    return None
