"""PatchScaler training (paper §4.1): the GRM with the confidence-driven loss (Eq. 1) for its first
phase, and the Patch-DiT with the diffusion loss on the standard x-trajectory — PGS is not used in
training — with Real-ESRGAN degradations. Joint training with the DiT conditioned on
stopgrad(GRM(y_LR)) for the first `grm_steps`, then the GRM is frozen (our reading, PATCHSCALER.md D4).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, hint
from ..methods.patchscaler.model import (
    DEFAULT_BASE,
    ENV_BASE,
    PatchScalerConfig,
    PatchScalerNets,
    load_weights,
    save_weights,
)
from ..sd import load_sd_parts, resolve_base
from .config import PatchScalerTrainConfig


class _Objective(nn.Module):
    """The trained networks and both losses as one module (one DDP wrapper, one forward per step)."""

    def __init__(self, nets: PatchScalerNets, cfg: PatchScalerTrainConfig, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.nets = nets
        self.cfg = cfg
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, z_lr: torch.Tensor, x_hr: torch.Tensor, eta: float | None, generator: torch.Generator):
        """eta: Eq. (1)'s η while the GRM trains; None once it is frozen."""
        from ..methods.patchscaler.dit import diffusion_loss
        from ..methods.patchscaler.grm import grm_loss
        from ..methods.patchscaler.pgs import split_patches

        cfg, nets = self.cfg, self.nets
        logs: dict[str, float] = {}
        y_hr, conf = nets.grm(z_lr)
        loss = z_lr.new_zeros(())
        if eta is not None:
            l_grm, parts = grm_loss(y_hr, x_hr, conf, lam=cfg.grm_lambda, eta=eta)
            loss = loss + l_grm
            logs.update(
                loss_grm=float(l_grm), eta=float(eta), **{f"grm_{k}": float(v) for k, v in parts.items()}
            )
        # Patch-DiT on non-overlapping V×V patches of stopgrad(y_HR) and of the HR latent (our choice, D4)
        y0 = torch.cat([split_patches(y, cfg.patch, cfg.patch)[0] for y in y_hr.detach()])
        x0 = torch.cat([split_patches(x, cfg.patch, cfg.patch)[0] for x in x_hr])
        prompt = nets.prompts(y0, cfg.texture_k)
        l_diff = diffusion_loss(nets.dit, x0, y0, prompt, self.alphas_cumprod, generator=generator)
        logs["loss_diffusion"] = float(l_diff)
        return loss + l_diff, logs, conf.detach()


class PatchScalerTrainer:
    """The PatchScaler MethodTrainer (see train/loop.py)."""

    def __init__(self, cfg: PatchScalerTrainConfig):
        if not cfg.rtm:
            raise ConfigError("PatchScaler training needs a texture memory: build one with `diffsr build-rtm` and "
                              f"pass {hint('rtm=DIR', '--rtm DIR')}")  # fmt: skip
        self.cfg = cfg
        self.phase: int | None = None
        self.optimizer = self.scheduler = None
        self.eta: float | None = cfg.grm_eta if cfg.grm_eta > 0 else None
        self.eta_calibrated_at: int | None = None
        # (name, hr, lr) crops η is calibrated on; the loop sets it (the validation split, else held-out
        # training crops)
        self.calibration_split: list | None = None

    def setup(self, accelerator) -> None:
        from ..methods.patchscaler.dit import PRESETS
        from ..methods.patchscaler.memory import load_texture_memory

        cfg, self.acc = self.cfg, accelerator
        dev = accelerator.device
        parts = load_sd_parts(
            resolve_base(cfg.base, default=DEFAULT_BASE, env=ENV_BASE), device=dev, text_encoder=False
        )
        self.vae = parts.vae
        if cfg.dit_preset not in PRESETS:
            raise ConfigError(f"dit_preset={cfg.dit_preset!r} is not one of {', '.join(PRESETS)}")
        classifier, rtm = load_texture_memory(cfg.rtm)
        dit = asdict(PRESETS[cfg.dit_preset])
        self.config = PatchScalerConfig(patch=cfg.patch, schedule=cfg.schedule, texture_k=cfg.texture_k, dit=dit,
                                        grm_widths=tuple(cfg.grm_widths), grm_blocks=cfg.grm_blocks,
                                        texture_depth=cfg.texture_depth,
                                        base=cfg.base or DEFAULT_BASE)  # fmt: skip
        if cfg.init_weights:
            self.config, nets = load_weights(cfg.init_weights)
        else:
            nets = PatchScalerNets(self.config, classifier, rtm)
        nets.rtm = nets.rtm.to(dev)
        objective = _Objective(nets, cfg, self.config.alphas_cumprod())
        for n, p in objective.named_parameters():
            p.requires_grad_(not n.startswith("nets.classifier."))
        if cfg.gradient_checkpointing:  # the trained networks (the VAE is frozen: nothing to save there)
            nets.grm.gradient_checkpointing = nets.dit.gradient_checkpointing = True
        objective.train()
        nets.classifier.eval()
        self.objective = accelerator.prepare(objective)

    @property
    def nets(self) -> PatchScalerNets:
        return self.acc.unwrap_model(self.objective).nets

    def on_step(self, step: int) -> None:
        cfg = self.cfg
        phase = 1 if step < cfg.grm_steps else 2
        if phase != self.phase:
            self.enter_phase(phase, step)
        if phase == 1 and cfg.grm_eta == 0 and (self.eta is None or (step == cfg.grm_eta_warmup
                                                                     and self.eta_calibrated_at != step)):  # fmt: skip
            self.eta = self.calibrate_eta()
            self.eta_calibrated_at = step

    @torch.no_grad()
    def calibrate_eta(self) -> float:
        """η from the GRM's current per-pixel errors e² on the calibration split (PATCHSCALER.md D3: the
        median pixel gets C = 1): once at the start and once after `grm_eta_warmup` steps, never per
        batch. Every process computes it on the same crops; the main process's value is broadcast."""
        from ..degradations import upsample_to_hr
        from ..methods.patchscaler.grm import calibrate_eta

        if not self.calibration_split:
            raise ConfigError(
                "PatchScaler's η calibration needs a calibration split (set by the training loop)"
            )
        grm = self.nets.grm
        was_training = grm.training
        grm.eval()
        errs = []
        try:
            for _, hr, lr in self.calibration_split:
                dev = self.acc.device
                lr_up = upsample_to_hr(lr.to(dev), hr.shape[-1] // lr.shape[-1]) * 2 - 1
                y, _ = grm(self._encode(lr_up))
                errs.append((y - self._encode(hr.to(dev) * 2 - 1)).pow(2).sum(1).flatten().cpu())
        finally:
            grm.train(was_training)
        eta = torch.tensor([calibrate_eta(torch.cat(errs))], dtype=torch.float64, device=self.acc.device)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            eta = broadcast(eta, from_process=0)
        return float(eta.item())

    def enter_phase(self, phase: int, step: int = 0) -> None:
        """Phase 1: GRM + Patch-DiT + texture encoder; phase 2: GRM frozen (fresh optimizer, as at PiSA-SR's
        stage switch, so Adam's state cannot move the frozen GRM). The learning-rate schedule spans the
        whole run: the new scheduler starts where the old one was (`step`), not from its beginning."""
        import warnings

        from .loop import optimizer_and_scheduler

        cfg, nets = self.cfg, self.nets
        for p in nets.grm.parameters():
            p.requires_grad_(phase == 1)
            p.grad = None
        params = [
            p for n, p in nets.named_parameters() if p.requires_grad and not n.startswith("classifier.")
        ]
        opt, sched = optimizer_and_scheduler(cfg, params, steps=cfg.max_steps, decoupled=False)  # paper: Adam
        # the scheduler stays unprepared: accelerate's wrapper would step it once per process
        self.optimizer, self.scheduler = self.acc.prepare(opt), sched
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                sched.step()
        self.phase = phase

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    def train_step(self, batch: dict, step: int, gen) -> dict[str, float]:
        from ..methods.patchscaler.grm import group_fractions

        cfg = self.cfg
        z_lr, x_hr = self._encode(batch["lr_up"]), self._encode(batch["hr"])
        with self.acc.accumulate(self.objective), self.acc.autocast():
            loss, logs, conf = self.objective(
                z_lr, x_hr, self.eta if self.phase == 1 else None, gen("diffusion")
            )
            self.acc.backward(loss)
            if self.acc.sync_gradients:
                params = [p for p in self.nets.parameters() if p.requires_grad]
                self.acc.clip_grad_norm_(params, cfg.max_grad_norm)
            self.optimizer.step()
            if self.acc.sync_gradients:  # once per update, not per micro-batch
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs["loss"] = float(loss)
        logs.update(
            {f"group_{k}": v for k, v in group_fractions(conf, patch=cfg.patch, stride=cfg.patch).items()}
        )
        return logs

    @torch.no_grad()
    def validate_forward(self, lr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
        from ..methods.patchscaler.model import PatchScaler
        from ..sd import SDParts

        obj = self.acc.unwrap_model(self.objective)
        obj.eval()
        try:
            model = PatchScaler(SDParts(None, self.vae, None, None, torch.zeros(1)), self.config, self.nets,
                                dtype=torch.float32, freeze=False)  # fmt: skip
            y, _ = model.restore(lr, chunk_size=16)
            return y.to(lr.device) * 2 - 1
        finally:
            obj.train()
            self.nets.classifier.eval()

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        nets = self.nets
        return {
            f"{g}.{k}": v
            for g in ("grm", "dit", "texture_encoder")
            for k, v in getattr(nets, g).state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        nets = self.nets
        for g in ("grm", "dit", "texture_encoder"):
            getattr(nets, g).load_state_dict(
                {k[len(g) + 1 :]: v for k, v in tensors.items() if k.startswith(g + ".")}
            )

    def optimizer_states(self) -> dict:
        return {
            "phase": self.phase,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grm_eta": self.eta,
            "grm_eta_calibrated_at": self.eta_calibrated_at,
        }

    def load_optimizer_states(self, states: dict, step: int) -> None:
        self.enter_phase(1 if step < self.cfg.grm_steps else 2, step)
        if states.get("grm_eta") is not None:  # the calibrated η carries on; it is not re-measured
            self.eta, self.eta_calibrated_at = float(states["grm_eta"]), states.get("grm_eta_calibrated_at")
        if states.get("phase") == self.phase:
            self.optimizer.load_state_dict(states["optimizer"])
            self.scheduler.load_state_dict(states["scheduler"])

    def export(self, folder: Path) -> Path:
        return save_weights(folder, self.config, self.nets)
