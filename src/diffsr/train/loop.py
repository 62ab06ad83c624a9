"""The training loop shared by every method, on top of accelerate.

accelerate provides devices, multi-GPU/multi-node (DDP), gradient accumulation and mixed precision;
this module adds what makes runs reproducible and resumable:

- every random draw of a step (degradation parameters, crops, noise, prompt dropout, CSD timesteps)
  comes from generators seeded by (seed, step, process), and the data order by (seed, epoch), so a
  resumed run makes exactly the draws the uninterrupted run would have made;
- checkpoints every N steps are written to a temporary folder and renamed into place (atomic), the
  last K are kept, and `resume` restores trainable weights, optimizer and scheduler states and the
  step counter;
- periodic validation (PSNR/SSIM on Y, crop 4, images saved), logs to TensorBoard or CSV, and a
  final export in diffsr's format that `diffsr upscale --weights` loads.

A method plugs in through `MethodTrainer` (see train/pisa.py, train/s3diff.py).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import ConfigError, ImageError, hint
from .config import TrainConfig

CHECKPOINTS = "checkpoints"


class MethodTrainer(Protocol):
    """What a method provides to the loop."""

    cfg: TrainConfig

    def setup(self, accelerator) -> None:
        """Build models, trainable parameters, optimizers and schedulers; prepare them."""

    def train_step(self, batch: dict, step: int, gen: Callable[[str], torch.Generator]) -> dict[str, float]:
        """One optimizer update's worth of work for one micro-batch; returns scalar logs."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that training changes (weights), by name."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def optimizer_states(self) -> dict: ...

    def load_optimizer_states(self, states: dict, step: int) -> None: ...

    def on_step(self, step: int) -> None:
        """Called before each update (PiSA-SR switches stage here)."""

    @torch.no_grad()
    def validate_forward(self, lr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
        """lr (B,3,h,w) in [0,1], lr_up (B,3,H,W) in [-1,1] → SR (B,3,H,W) in [-1,1]."""

    def export(self, folder: Path) -> Path: ...


def build_trainer(cfg: TrainConfig) -> MethodTrainer:
    """The MethodTrainer for cfg.method."""
    if cfg.method == "pisa":
        from .pisa import PisaTrainer

        return PisaTrainer(cfg)
    if cfg.method == "s3diff":
        from .s3diff import S3DiffTrainer

        return S3DiffTrainer(cfg)
    if cfg.method == "patchscaler":
        from .patchscaler import PatchScalerTrainer

        return PatchScalerTrainer(cfg)
    raise ConfigError(f"no trainer for method {cfg.method!r}")


def optimizer_and_scheduler(cfg: TrainConfig, params, *, steps: int, decoupled: bool = True):
    """The run's optimizer over `params` — AdamW (decoupled weight decay), or Adam for PatchScaler —
    with cfg's betas/eps/decay, and its learning-rate schedule over `steps` updates (unprepared)."""
    from diffusers.optimization import get_scheduler

    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
              weight_decay=cfg.weight_decay)  # fmt: skip
    sched = get_scheduler(cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps,
                          num_training_steps=max(steps, 1))  # fmt: skip
    return opt, sched


def derived_seed(*parts) -> int:
    """A 63-bit seed from any hashable parts (stable across runs, processes and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def epoch_batches(
    n_items: int, batch_size: int, epoch: int, seed: int, rank: int, world: int
) -> tuple[tuple[int, ...], ...]:
    """This process's batches for one epoch: a seeded permutation, split across processes, full batches."""
    perm = torch.randperm(
        n_items, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    )
    mine = perm[rank::world].tolist()
    return tuple(tuple(mine[i : i + batch_size]) for i in range(0, len(mine) - batch_size + 1, batch_size))


class _CSVLog:
    """Logs as rows of (step, name, value): any set of values per step, appendable across resumes."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run logs those steps again)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
        if len(keep) != len(rows):
            from ..checkpoints import atomic_write

            def write(p):
                with open(p, "w", newline="") as f:
                    csv.writer(f).writerows(keep)

            atomic_write(self.path, write)

    def log(self, values: dict, step: int) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "name", "value"])
            w.writerows([step, k, v] for k, v in values.items())


def list_checkpoints(output_dir: Path) -> list[Path]:
    d = output_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()
    )


def save_checkpoint(trainer: MethodTrainer, output_dir: Path, step: int, keep_last: int,
                    ema: dict[str, torch.Tensor] | None = None, scaler=None) -> Path:  # fmt: skip
    """Write checkpoints/step-NNNNNNN atomically (temp folder + rename) and prune to the last K."""
    from safetensors.torch import save_file

    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainer.state_tensors().items()}
        save_file(tensors, tmp / "weights.safetensors")
        if ema is not None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save(trainer.optimizer_states(), tmp / "optimizer.pt")
        if scaler is not None:  # fp16's loss scale: a resumed run must not restart it
            torch.save(scaler.state_dict(), tmp / "grad_scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": trainer.cfg.to_dict()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(trainer: MethodTrainer, ckpt: Path, scaler=None) -> int:
    """Restore weights, optimizer/scheduler states (and fp16's GradScaler state into `scaler`); return
    the step the checkpoint was taken at."""
    from safetensors.torch import load_file

    if not (ckpt / "state.json").is_file():
        raise ConfigError(f"{ckpt}: not a diffsr checkpoint folder (no state.json)")
    state = json.loads((ckpt / "state.json").read_text())
    step = int(state["step"])
    trainer.load_state_tensors(load_file(ckpt / "weights.safetensors"))
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    trainer.load_optimizer_states(opt, step)
    if scaler is not None and (ckpt / "grad_scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt / "grad_scaler.pt", map_location="cpu", weights_only=True))
    return step


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of this process (k counts from the start of training): its images decoded and
    cropped, degraded with the draws of (seed, step, micro-batch, process), as a dict of
    hr/lr_up in [-1, 1], lr in [0, 1] and captions. An index, not a position in a stream, so a resumed
    run picks up at its step; with `num_workers` a DataLoader builds them in worker processes (on the
    CPU), overlapped with training; without, in this process on `device`."""

    def __init__(self, dataset, cfg: TrainConfig, rank: int, world: int, per_epoch: int, device=None):
        self.dataset, self.cfg, self.rank, self.world, self.per_epoch = dataset, cfg, rank, world, per_epoch
        self.device = device

    def __len__(self) -> int:
        return self.cfg.max_steps * self.cfg.grad_accum

    def __getitem__(self, k: int) -> dict:
        from ..degradations import get_preset, training_inputs, upsample_to_hr

        cfg = self.cfg
        step, micro = divmod(k, cfg.grad_accum)
        epoch, pos = divmod(k, self.per_epoch)
        self.dataset.set_epoch(epoch)
        idx = epoch_batches(len(self.dataset), cfg.batch_size, epoch, cfg.seed, self.rank, self.world)[pos]
        items = [self.dataset[i] for i in idx]
        g = torch.Generator().manual_seed(derived_seed(cfg.seed, "degradation", step, micro, self.rank))
        hr = torch.stack([it["hr"] for it in items])
        if self.device is not None:
            hr = hr.to(self.device)
        if "lr" in items[0]:  # real pairs: the model input is the bicubic upsampling, as at inference
            lr = torch.stack([it["lr"] for it in items]).to(hr.device)
            lr_up = upsample_to_hr(lr, hr.shape[-1] // lr.shape[-1])
        else:  # synthetic: the preset's degradations and LR upsampling, as the authors' scripts
            lr, lr_up = training_inputs(hr, get_preset(cfg.degradation), g)
        return {
            "hr": hr * 2 - 1,
            "lr": lr,
            "lr_up": lr_up * 2 - 1,
            "caption": [it["caption"] for it in items],
        }

    def loader(self, start: int, num_workers: int):
        """Micro-batches start, start+1, … (workers prefetch ahead when num_workers > 0)."""
        sub = torch.utils.data.Subset(self, range(start, len(self)))
        return torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=num_workers,
                                           persistent_workers=False, prefetch_factor=2 if num_workers else None)  # fmt: skip


class EMA:
    """Exponential moving average of the trained tensors: avg ← d·avg + (1 − d)·w after every update,
    kept in float32 on the tensors' device."""

    def __init__(self, tensors: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.avg = {k: v.detach().float().clone() for k, v in tensors.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, a in self.avg.items():
            a.mul_(self.decay).add_(tensors[k].detach().float(), alpha=1 - self.decay)


class TrainingStopped(Exception):
    """SIGTERM (preemption) arrived; a checkpoint of the last finished step was written."""

    def __init__(self, checkpoint: Path):
        super().__init__(
            f"stopped by SIGTERM; resume with {hint('resume=True', '--resume')} (checkpoint {checkpoint})"
        )
        self.checkpoint = checkpoint


def run_training(trainer: MethodTrainer, *, resume: bool | str | os.PathLike = False,
                 log: Callable[[str], None] = print, stop_after: int | None = None) -> Path:  # fmt: skip
    """Train until cfg.max_steps (or `stop_after` updates in this call, for tests) and export.

    resume: True continues from the run's last checkpoint, a path from that checkpoint folder. On
    SIGTERM the current step finishes, a checkpoint is written and TrainingStopped is raised.
    Returns the export folder (output_dir/final) once max_steps is reached, else the last checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from . import preflight
    from .data import HQImageDataset, PairedImageDataset

    cfg = trainer.cfg
    out = Path(cfg.output_dir)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(f"{hint('mixed_precision=fp16', '--mixed-precision fp16')} needs a CUDA GPU (on the CPU use "
                          "bf16 or no)")  # fmt: skip
    preflight.check(cfg)  # every weight file found (or a one-line error) before anything heavy
    # find_unused_parameters: PiSA-SR's stage 1 leaves the semantic LoRA unused by the forward
    accelerator = Accelerator(
        # CPU-only machines: cpu=True lets torchrun/accelerate launch run several processes over gloo
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if cfg.log_with == "tensorboard" else None,
        project_dir=str(out),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:  # one voice: rank 0 prints for the run
        log = lambda _line: None  # noqa: E731
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / CHECKPOINTS).glob(".step-*.tmp-*") if (out / CHECKPOINTS).is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while it saved
        existing = list_checkpoints(out)
        if existing and not resume:
            raise ConfigError(
                f"{out} already holds checkpoints; pass {hint('resume=True', '--resume')} to continue or use a new folder"
            )
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()

    if cfg.pairs:
        dataset = PairedImageDataset(cfg.pairs, crop_size=cfg.crop_size, scale=cfg.pair_scale, hflip=cfg.hflip,
                                     seed=cfg.seed)  # fmt: skip
    else:
        dataset = HQImageDataset(cfg.data, crop_size=cfg.crop_size, min_size=cfg.min_size, hflip=cfg.hflip,
                                 seed=cfg.seed)  # fmt: skip
    per_epoch = len(dataset) // (cfg.batch_size * world)
    if per_epoch < 1:
        raise ConfigError(
            f"{len(dataset)} training images are fewer than one batch ({cfg.batch_size} x {world})"
        )

    # initial weights (LoRA A, discriminator heads) from the seed, identical on every process
    set_seed(derived_seed(cfg.seed, "init") % 2**32)
    trainer.setup(accelerator)
    step = 0
    start = None
    if resume is not False and resume is not None:
        start = Path(resume) if not isinstance(resume, bool) else (list_checkpoints(out) or [None])[-1]
        if start is not None:
            step = load_checkpoint(trainer, start, accelerator.scaler)
            log(f"resumed from {start} at step {step}")
    ema = EMA(trainer.state_tensors(), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and start is not None and (start / "ema.safetensors").is_file():
        from safetensors.torch import load_file

        for k, v in load_file(start / "ema.safetensors").items():
            ema.avg[k].copy_(v)
    if accelerator.is_main_process and cfg.log_with == "tensorboard":
        accelerator.init_trackers("diffsr")
    csv_log = _CSVLog(out / "logs.csv") if cfg.log_with == "csv" and accelerator.is_main_process else None
    if csv_log:
        csv_log.truncate_after(step)

    def log_values(values: dict, at: int) -> None:
        if csv_log:
            csv_log.log(values, at)
        elif accelerator.is_main_process:
            accelerator.log(values, step=at)

    has_val = bool(cfg.val_data or cfg.val_pairs)
    val = _validation_set(cfg) if has_val and accelerator.is_main_process else None
    val_lpips = _validation_lpips(trainer, cfg, log) if val is not None else None
    if hasattr(trainer, "calibration_split"):  # PatchScaler's η: the validation split, or held-out crops
        trainer.calibration_split = _validation_set(cfg, fallback_to_training=True)
    done_here = 0
    t0 = time.perf_counter()
    term = _SigtermFlag()
    micro_batches = MicroBatches(dataset, cfg, rank, world, per_epoch,
                                 device=None if cfg.num_workers else accelerator.device)  # fmt: skip
    batches = iter(micro_batches.loader(start=step * cfg.grad_accum, num_workers=cfg.num_workers))
    try:
        while step < cfg.max_steps and (stop_after is None or done_here < stop_after):
            trainer.on_step(step)
            logs: dict[str, float] = {}

            def gen_of(micro: int, _s=step) -> Callable[[str], torch.Generator]:
                return lambda kind: torch.Generator().manual_seed(
                    derived_seed(cfg.seed, kind, _s, micro, rank)
                )

            def fetch() -> dict:
                batch = next(batches)
                return {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}

            if hasattr(trainer, "train_update"):  # the trainer runs its own accumulation (S3Diff)
                logs = trainer.train_update([fetch() for _ in range(cfg.grad_accum)], step, gen_of)
            else:
                for micro in range(cfg.grad_accum):
                    logs = trainer.train_step(fetch(), step, gen_of(micro))
            step += 1
            done_here += 1
            if ema is not None:
                ema.update(trainer.state_tensors())
            stop = term.raised(accelerator)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                if world > 1 and logs:  # every rank's values, averaged (a collective: all ranks are here)
                    names = sorted(logs)
                    vals = accelerator.reduce(torch.tensor([float(logs[k]) for k in names], dtype=torch.float64,
                                                           device=accelerator.device), reduction="mean")  # fmt: skip
                    logs = dict(zip(names, vals.tolist(), strict=True))
                logs["lr"] = _current_lr(trainer)
                logs["sec_per_step"] = (time.perf_counter() - t0) / done_here
                log_values(logs, step)
                log(f"step {step}/{cfg.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(
                        trainer, out, step, cfg.keep_last, ema.avg if ema else None, accelerator.scaler
                    )
                accelerator.wait_for_everyone()
            if stop:
                log(
                    f"SIGTERM: checkpoint of step {step} written; continue with {hint('resume=True', '--resume')}"
                )
                raise TrainingStopped(out / CHECKPOINTS / f"step-{step:07d}")
            if val is not None and (step % cfg.validate_every == 0 or step == cfg.max_steps):
                metrics = _validate(
                    trainer, val, out / "val" / f"step-{step:07d}", accelerator.device, val_lpips
                )
                log_values(metrics, step)
                log(f"validation at step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    finally:
        term.restore()
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group, and a
        tracker.finish()  # caller (a notebook, a test, `--resume` in the same process) may train again
    if step < cfg.max_steps:
        ckpts = list_checkpoints(out)
        return ckpts[-1] if ckpts else out
    final = out / "final"
    if accelerator.is_main_process:
        if ema is None:
            trainer.export(final)
        else:  # the export holds the average; the live weights come back afterwards
            live = {k: v.detach().clone() for k, v in trainer.state_tensors().items()}
            trainer.load_state_tensors({k: ema.avg.get(k, v).to(v.dtype) for k, v in live.items()})
            try:
                trainer.export(final)
            finally:
                trainer.load_state_tensors(live)
        log(f"exported {final} (load it with: diffsr upscale --method {cfg.method} --weights {final} ...)")
    accelerator.wait_for_everyone()
    return final


class _SigtermFlag:
    """Turns SIGTERM (preemption, `kill`) into a flag the loop reads after each step; every rank
    learns of it (max over ranks), so all of them checkpoint and stop together."""

    def __init__(self):
        import signal
        import threading

        self.hit = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum, _frame) -> None:
        self.hit = True

    def raised(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.hit
        flag = torch.tensor([1.0 if self.hit else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _current_lr(trainer) -> float:
    opt = getattr(trainer, "optimizer", None)
    return float(opt.param_groups[0]["lr"]) if opt is not None else float("nan")


def _validation_set(
    cfg: TrainConfig, fallback_to_training: bool = False
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, hr (1,3,S,S) [0,1], lr (1,3,S/s,S/s) [0,1]) for the first val_count images: centre crops
    (mirror-padded if small) of the real pairs (val_pairs), or of HR images (val_data; with
    `fallback_to_training`, the first training images or pairs when no validation data is given)
    degraded by the training preset with a fixed seed per image."""
    from ..io import find_images, read_image
    from ..pairs import degrade_image, image_seed
    from .data import _pad_pair, fit_pair, resolve_pairs, resolve_sources

    s = cfg.val_crop
    pairs = cfg.val_pairs or (cfg.pairs if fallback_to_training and not cfg.val_data else None)
    rgb = lambda a: np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a  # noqa: E731
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float()  # noqa: E731
    items = []
    if pairs:
        scale = cfg.pair_scale
        for lr_p, hr_p in resolve_pairs(pairs)[: cfg.val_count]:
            lr = rgb(read_image(lr_p, max_pixels=None).pixels)
            try:
                hr = fit_pair(lr, rgb(read_image(hr_p, max_pixels=None).pixels), scale, lr_p)
            except ImageError as e:
                raise ConfigError(f"validation pair {hr_p}: {e}") from None
            lr, hr = _pad_pair(lr, hr, s // scale, scale)
            y, x = (lr.shape[0] - s // scale) // 2, (lr.shape[1] - s // scale) // 2
            lr = lr[y : y + s // scale, x : x + s // scale]
            hr = hr[y * scale : y * scale + s, x * scale : x * scale + s]
            items.append((hr_p.stem, to_t(hr), to_t(lr)))
        return items
    if cfg.val_data:
        sources = find_images([cfg.val_data])[: cfg.val_count]
    elif fallback_to_training:
        sources = [(p, Path(p.name)) for p in resolve_sources(cfg.data)[: cfg.val_count]]
    else:
        return []
    for src, rel in sources:
        px = rgb(read_image(src, max_pixels=None).pixels)
        ph, pw = max(0, s - px.shape[0]), max(0, s - px.shape[1])
        if ph or pw:
            px = np.pad(px, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        y, x = (px.shape[0] - s) // 2, (px.shape[1] - s) // 2
        hr = np.ascontiguousarray(px[y : y + s, x : x + s])
        lr, _ = degrade_image(hr, cfg.degradation, image_seed(cfg.seed, rel))
        items.append((rel.as_posix(), to_t(hr), to_t(lr)))
    return items


def _validation_lpips(trainer: MethodTrainer, cfg: TrainConfig, log: Callable[[str], None]):
    """The LPIPS network validation reports with: the trainer's own when it has one, else a fresh one;
    None (said once) when the lpips package or its weights are missing."""
    if getattr(trainer, "lpips", None) is not None:
        return trainer.lpips
    from ..errors import DiffSRError

    try:
        from .losses import LPIPSLoss
        from .preflight import lpips_backbone

        weights = lpips_backbone("vgg", cfg.lpips_weights) if cfg.lpips_pretrained else None
        return LPIPSLoss(net="vgg", pretrained=cfg.lpips_pretrained, weights=weights)
    except DiffSRError as e:
        log(f"validation reports PSNR/SSIM only: LPIPS unavailable ({e})")
        return None


def _validate(trainer: MethodTrainer, items, folder: Path, device, lpips=None) -> dict[str, float]:
    from ..degradations import upsample_to_hr
    from ..io import ImageData, write_image
    from ..metrics.psnr_ssim import psnr, ssim

    psnrs, ssims, lpipss = [], [], []
    for name, hr, lr in items:
        lr_d = lr.to(device)
        sr_t = trainer.validate_forward(lr_d, upsample_to_hr(lr_d, hr.shape[-1] // lr.shape[-1]) * 2 - 1)
        sr_t = sr_t.float().clamp(-1, 1)
        if lpips is not None:
            with torch.no_grad():
                lpipss.append(float(lpips(sr_t, (hr.to(sr_t.device) * 2 - 1)).mean()))
        sr = ((sr_t + 1) / 2)[0].permute(1, 2, 0).cpu().numpy()
        gt = hr[0].permute(1, 2, 0).numpy()
        psnrs.append(psnr(sr * 255, gt * 255, crop_border=4, test_y_channel=True))
        ssims.append(ssim(sr * 255, gt * 255, crop_border=4, test_y_channel=True))
        write_image(folder / f"{name}.png", ImageData(sr.astype(np.float32), None, 8), overwrite=True)
        # LR (nearest, to the HR size) | SR | HR side by side, to see what the model did at a glance
        lr_big = np.repeat(np.repeat(lr[0].permute(1, 2, 0).numpy(), gt.shape[0] // lr.shape[-2], 0),
                           gt.shape[1] // lr.shape[-1], 1)  # fmt: skip
        strip = np.concatenate([lr_big, sr, gt], axis=1).astype(np.float32)
        write_image(folder / f"{name}_lr-sr-hr.png", ImageData(np.clip(strip, 0, 1), None, 8), overwrite=True)
    out = {"val/psnr": float(np.mean(psnrs)), "val/ssim": float(np.mean(ssims))}
    if lpipss:
        out["val/lpips"] = float(np.mean(lpipss))
    return out
