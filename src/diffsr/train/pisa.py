"""PiSA-SR training: stage 1 trains the pixel LoRA with L2; stage 2 freezes it and trains the
semantic LoRA with L2·1 + LPIPS(VGG)·2 + CSD·1 (paper §3, the authors' recipe).

Where the authors' script goes wrong, this one does not (see DESIGN §3):
- the trainable set is exactly one LoRA set per stage, and a fresh optimizer is built at the switch,
  so AdamW's state and weight decay never move the frozen pixel LoRA;
- the UNet is wrapped for DDP with both sets registered (find_unused_parameters), so the semantic
  LoRA's gradients are all-reduced in stage 2;
- CSD is not computed while its weight is 0 (all of stage 1), and its frozen SD UNet is the same
  UNet with the LoRA layers bypassed, not a second copy of the weights;
- the run stops after pix_steps + sem_steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import lora
from ..methods.pisa import DEFAULT_BASE, ENV_BASE, PisaConfig, PisaWeights
from ..sd import encode_prompts, load_sd_parts, resolve_base
from .config import PisaTrainConfig


class PisaTrainer:
    """The PiSA-SR MethodTrainer (see train/loop.py)."""

    def __init__(self, cfg: PisaTrainConfig):
        self.cfg = cfg
        self.stage: int | None = None
        self.optimizer = self.scheduler = None

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        from .losses import LPIPSLoss

        cfg, self.acc = self.cfg, accelerator
        dev = accelerator.device
        folder = resolve_base(cfg.base, default=DEFAULT_BASE, env=ENV_BASE)
        parts = load_sd_parts(folder, device=dev, dtype=torch.float32)
        self.vae, self.text_encoder, self.tokenizer = parts.vae, parts.text_encoder, parts.tokenizer
        self.alphas_cumprod = parts.alphas_cumprod.to(dev)
        unet = parts.unet
        self.targets = tuple(lora.unet_lora_targets(unet))
        lora.add_lora(unet, "pix", self.targets, cfg.rank_pix, 8.0)
        lora.add_lora(unet, "sem", self.targets, cfg.rank_sem, 8.0)
        if cfg.init_weights:
            w = PisaWeights.load(cfg.init_weights)
            lora.load_lora_tensors(unet, "pix", w.pix)
            lora.load_lora_tensors(unet, "sem", w.sem)
        # Register BOTH sets with DDP (the authors build DDP while the semantic set is frozen, so its
        # gradients are never all-reduced); the stages then switch requires_grad.
        for n, p in unet.named_parameters():
            p.requires_grad_(".lora_" in n)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = accelerator.prepare(unet)
        self.lpips = LPIPSLoss(
            net=cfg.lpips_net, pretrained=cfg.lpips_pretrained, weights=cfg.lpips_weights
        ).to(dev)
        self.null_emb = self._embed([""])
        self.neg_emb = self._embed([cfg.neg_prompt_csd])
        self.timestep = torch.tensor([cfg.timestep], device=dev, dtype=torch.long)

    @property
    def base_unet(self):
        return self.acc.unwrap_model(self.unet)

    def _embed(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, prompts).float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ stages
    def stage_of(self, step: int) -> int:
        return 1 if step < self.cfg.pix_steps else 2

    def on_step(self, step: int) -> None:
        if self.stage_of(step) != self.stage:
            self.enter_stage(self.stage_of(step))

    def enter_stage(self, stage: int) -> None:
        """Stage 1: pixel LoRA active and trainable. Stage 2: both active, only the semantic trainable.
        A new optimizer (and scheduler) over exactly the trainable set is built at each switch."""
        from .loop import optimizer_and_scheduler

        cfg = self.cfg
        unet = self.base_unet
        lora.set_active_adapters(unet, ["pix"] if stage == 1 else ["pix", "sem"])
        train_set = "pix" if stage == 1 else "sem"
        for n, p in unet.named_parameters():
            p.requires_grad_(f".{train_set}." in n and ".lora_" in n)
            p.grad = None
        steps = cfg.pix_steps if stage == 1 else cfg.sem_steps
        opt, sched = optimizer_and_scheduler(cfg, self.trainable_parameters(), steps=steps)
        # the scheduler stays unprepared: accelerate's wrapper would step it once per process
        self.optimizer, self.scheduler = self.acc.prepare(opt), sched
        self.stage = stage

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        if generator is None:
            return dist.mode() * self.vae.config.scaling_factor
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device, dist.mean.dtype)
        return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor

    def generate(self, x_src: torch.Tensor, cond: torch.Tensor, generator=None, unet=None):
        """x_src (B,3,H,W) in [-1,1] → (image in [-1,1], z_H). VAE frozen; gradients reach the LoRA."""
        with torch.no_grad():
            z = self._encode(x_src, generator)
        eps = (unet or self.unet)(z, self.timestep, encoder_hidden_states=cond).sample
        z_h = z - eps
        img = self.vae.decode(z_h / self.vae.config.scaling_factor).sample.clamp(-1, 1)
        return img, z_h

    def train_step(self, batch: dict, step: int, gen) -> dict[str, float]:
        from .losses import csd_loss

        cfg = self.cfg
        x_src, x_tgt = batch["lr_up"], batch["hr"]
        b = x_src.shape[0]
        with torch.no_grad():
            prompt_emb = self._embed([f"{c}, {cfg.pos_prompt_csd}" for c in batch["caption"]])
        null = (
            torch.rand(1, generator=gen("null_text")).item() < cfg.null_text_ratio
        )  # per batch, as the authors
        cond = self.null_emb.expand(b, -1, -1) if null else prompt_emb
        logs = {}
        with self.acc.accumulate(self.unet), self.acc.autocast():
            img, z_h = self.generate(x_src, cond, gen("posterior") if cfg.sample_posterior else None)
            loss = F.mse_loss(img.float(), x_tgt.float()) * cfg.lambda_l2
            logs["loss_l2"] = loss.item()
            if self.stage == 2 and cfg.lambda_lpips > 0:
                loss_lpips = self.lpips(img.float(), x_tgt.float()).mean() * cfg.lambda_lpips
                loss = loss + loss_lpips
                logs["loss_lpips"] = loss_lpips.item()
            if self.stage == 2 and cfg.lambda_csd > 0:
                with lora.adapters_disabled(self.base_unet) as frozen_sd:
                    loss_csd = csd_loss(z_h.float(), frozen_sd, self.alphas_cumprod, prompt_emb,
                                        self.neg_emb.expand(b, -1, -1), t_min=cfg.csd_t_min, t_max=cfg.csd_t_max,
                                        cfg=cfg.csd_cfg, generator=gen("csd")) * cfg.lambda_csd  # fmt: skip
                loss = loss + loss_csd
                logs["loss_csd"] = loss_csd.item()
            self.acc.backward(loss)
            if self.acc.sync_gradients:
                self.acc.clip_grad_norm_(self.trainable_parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            if self.acc.sync_gradients:  # once per update, not per micro-batch
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs["loss"] = loss.item()
        logs["stage"] = float(self.stage)
        return logs

    @torch.no_grad()
    def validate_forward(self, lr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
        unet = self.base_unet
        unet.eval()
        try:
            img, _ = self.generate(lr_up, self.null_emb.expand(lr_up.shape[0], -1, -1), None, unet=unet)
        finally:
            unet.train()
        return img

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        unet = self.base_unet
        return {**lora.lora_state_dict(unet, "pix"), **lora.lora_state_dict(unet, "sem")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        unet = self.base_unet
        for name in ("pix", "sem"):
            lora.load_lora_tensors(unet, name, {k: v for k, v in tensors.items() if f".{name}." in k})

    def optimizer_states(self) -> dict:
        return {
            "stage": self.stage,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_optimizer_states(self, states: dict, step: int) -> None:
        self.enter_stage(self.stage_of(step))
        if states.get("stage") == self.stage:  # a checkpoint taken at the switch holds stage 1's state
            self.optimizer.load_state_dict(states["optimizer"])
            self.scheduler.load_state_dict(states["scheduler"])

    def weights(self) -> PisaWeights:
        cfg = self.cfg
        config = PisaConfig(
            self.targets, self.targets, cfg.rank_pix, cfg.rank_sem, base=cfg.base or DEFAULT_BASE
        )
        unet = self.base_unet
        cpu = lambda d: {k: v.detach().cpu().clone() for k, v in d.items()}  # noqa: E731
        return PisaWeights(
            config, cpu(lora.lora_state_dict(unet, "pix")), cpu(lora.lora_state_dict(unet, "sem"))
        )

    def export(self, folder: Path) -> Path:
        return self.weights().save(folder)
