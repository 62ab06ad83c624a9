"""S3Diff training: the degradation-guided LoRA (UNet rank 32 + trained conv_in, VAE encoder rank 16,
modulation MLPs and block embeddings) with L2·2 + LPIPS·5, then a generator GAN term ·0.5 against the
vision-aided discriminator (frozen DINO ViT-B/16 with DiffAugment, heads on blocks 4/8 and the class
token of block 11, BCE with real label 0.8 summed over the three levels).

As the authors: online negatives (with p = 0.05 a sample gets the negative prompt and its target
becomes the LR input), a reconstruction update and a GAN update of the generator per step, then a
real and a fake update of the discriminator; the degradation estimator stays frozen. Unlike the
authors' script:
- the generator's GAN backward does not leave gradients in the discriminator (its parameters are
  frozen for that backward), so the discriminator updates on its own losses only;
- with gradient accumulation (``grad_accum`` micro-batches per step; the authors' default is 4),
  each of the four updates averages its own loss over the step's micro-batches before it is
  applied. (Under accelerate's ``accumulate`` the authors' optimizer steps are skipped until the
  last micro-batch, where the reconstruction update then also carries the earlier micro-batches' GAN
  gradients.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsNotFoundError
from ..methods.s3diff import (
    DEFAULT_BASE,
    ENV_BASE,
    ENV_DE_NET,
    DegradationEstimator,
    S3Diff,
    S3DiffConfig,
    S3DiffWeights,
    de_net_help,
    initial_weights,
)
from ..sd import load_sd_parts, resolve_base
from .config import S3DiffTrainConfig


class S3DiffGenerator(nn.Module):
    """The trainable generator as one module (one DDP wrapper): UNet, VAE and modulation."""

    def __init__(self, model: S3Diff):
        super().__init__()
        self.unet, self.vae, self.modulation = model.unet, model.vae, model.modulation
        object.__setattr__(self, "model", model)  # hooks and schedule live there; not a submodule

    def forward(
        self, x_src: torch.Tensor, scores: torch.Tensor, embeds: torch.Tensor, generator=None
    ) -> torch.Tensor:
        """x_src (B,3,H,W) in [-1,1], scores (B,2), embeds (B,77,D) → SR (B,3,H,W) in [-1,1]."""
        m = self.model
        with m.modulated(scores):
            dist = self.vae.encode(x_src).latent_dist
            if generator is None:
                z = dist.mode()
            else:
                noise = torch.randn(dist.mean.shape, generator=generator).to(
                    dist.mean.device, dist.mean.dtype
                )
                z = dist.mean + dist.std * noise
            z = z * self.vae.config.scaling_factor
            eps = self.unet(z, m.timestep, encoder_hidden_states=embeds).sample
            x0 = m.x0(z, eps)
            return self.vae.decode(x0 / self.vae.config.scaling_factor).sample.clamp(-1, 1)


class S3DiffTrainer:
    """The S3Diff MethodTrainer (see train/loop.py)."""

    def __init__(self, cfg: S3DiffTrainConfig):
        self.cfg = cfg

    def setup(self, accelerator) -> None:
        from .loop import optimizer_and_scheduler
        from .losses import LPIPSLoss, VisionAidedDiscriminator

        cfg, self.acc = self.cfg, accelerator
        dev = accelerator.device
        de_path = cfg.de_net or os.environ.get(ENV_DE_NET)
        if not de_path:
            raise WeightsNotFoundError(de_net_help())
        de_net = DegradationEstimator.load(de_path)
        parts = load_sd_parts(resolve_base(cfg.base, default=DEFAULT_BASE, env=ENV_BASE), device=dev)
        if cfg.init_weights:
            weights = S3DiffWeights.load(cfg.init_weights)
        else:
            config = S3DiffConfig(
                rank_unet=cfg.rank_unet, rank_vae=cfg.rank_vae, base=cfg.base or DEFAULT_BASE
            )
            weights = initial_weights(parts.unet, parts.vae, seed=cfg.seed, config=config)
        self.model = S3Diff.from_parts(parts, weights, de_net=de_net)  # embeds the two prompts once
        gen = S3DiffGenerator(self.model)
        for n, p in gen.named_parameters():
            p.requires_grad_(".lora_" in n or n.startswith("unet.conv_in.") or n.startswith("modulation."))
        if cfg.gradient_checkpointing:
            gen.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self.model.checkpoint)
        gen.train()
        disc = VisionAidedDiscriminator(cfg.disc_backbone, pretrained=cfg.disc_pretrained,
                                        layers=tuple(cfg.disc_layers), head_channels=cfg.disc_head_channels,
                                        img_size=cfg.disc_img_size, weights=cfg.disc_weights,
                                        diffaug=cfg.disc_diffaug)  # fmt: skip
        disc.train()

        opt_g, sched_g = optimizer_and_scheduler(cfg, [p for p in gen.parameters() if p.requires_grad],
                                                 steps=cfg.max_steps)  # fmt: skip
        opt_d, sched_d = optimizer_and_scheduler(cfg, disc.trainable_parameters(), steps=cfg.max_steps)
        # schedulers stay unprepared (accelerate's wrapper steps them once per process); each steps once
        # per training step, after the generator's one or two updates
        self.scheduler, self.scheduler_d = sched_g, sched_d
        (self.gen, self.disc, self.optimizer, self.optimizer_d) = accelerator.prepare(gen, disc, opt_g, opt_d)
        self.lpips = LPIPSLoss(
            net=cfg.lpips_net, pretrained=cfg.lpips_pretrained, weights=cfg.lpips_weights
        ).to(dev)

    def on_step(self, step: int) -> None:
        pass

    def _g_params(self):
        return [p for p in self.acc.unwrap_model(self.gen).parameters() if p.requires_grad]

    def _g_step(self) -> None:
        """Apply the generator's accumulated gradients (one optimizer update)."""
        self.acc.clip_grad_norm_(self._g_params(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _d_step(self) -> None:
        self.acc.clip_grad_norm_(
            self.acc.unwrap_model(self.disc).trainable_parameters(), self.cfg.max_grad_norm
        )
        self.optimizer_d.step()
        self.optimizer_d.zero_grad(set_to_none=True)

    def _sync(self, module, last: bool):
        """DDP all-reduces gradients on the last micro-batch of an update only."""
        return contextlib.nullcontext() if last else self.acc.no_sync(module)

    def train_step(self, batch: dict, step: int, gen) -> dict[str, float]:
        """One training step on a single micro-batch (see :meth:`train_update`)."""
        return self.train_update([batch], step, lambda _micro: gen)

    def train_update(self, batches: list[dict], step: int, gen_of) -> dict[str, float]:
        """One training step over its micro-batches: four updates (generator reconstruction, generator
        GAN, discriminator real, discriminator fake), each from its loss averaged over the micro-batches
        (accelerate's backward divides by grad_accum). ``gen_of(i)`` gives micro-batch i's generators."""
        from .losses import d_loss_fake, d_loss_real, frozen, g_loss

        cfg, m, n = self.cfg, self.model, len(batches)
        self.acc.gradient_state._set_sync_gradients(True)  # optimizer steps are ours to place
        sums: dict[str, float] = {"negatives": 0.0}  # a count; the losses are means over the micro-batches

        def add(**vals):
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n

        prepared = []
        for i, batch in enumerate(batches):
            gen = gen_of(i)
            x_src, x_tgt = batch["lr_up"], batch["hr"]
            b = x_src.shape[0]
            with torch.no_grad():
                scores = m.de_net(batch["lr"].float())  # frozen estimator on the LR at its own size
            neg = torch.rand(b, generator=gen("negatives")).to(x_src.device) < cfg.neg_prob
            embeds = torch.where(neg[:, None, None], m.neg_embeds.float(), m.pos_embeds.float())
            target = torch.where(neg[:, None, None, None], x_src, x_tgt)
            prepared.append((gen, x_src, x_tgt, scores, b))
            with self._sync(self.gen, i == n - 1), self.acc.autocast():
                pred = self.gen(x_src, scores, embeds, gen("posterior") if cfg.sample_posterior else None)
                loss_l2 = F.mse_loss(pred.float(), target.float()) * cfg.lambda_l2
                loss_lpips = self.lpips(pred.float(), target.float()).mean() * cfg.lambda_lpips
                self.acc.backward(loss_l2 + loss_lpips)
            sums["negatives"] += float(neg.sum())
            add(loss_l2=loss_l2.item(), loss_lpips=loss_lpips.item())
        self._g_step()
        if cfg.lambda_gan > 0:
            disc = self.acc.unwrap_model(self.disc)
            preds = []
            for i, (gen, x_src, _, scores, b) in enumerate(prepared):
                pos = m.pos_embeds.float().expand(b, -1, -1)
                with self._sync(self.gen, i == n - 1), self.acc.autocast():
                    pred = self.gen(
                        x_src, scores, pos, gen("posterior_gan") if cfg.sample_posterior else None
                    )
                    with frozen(disc):  # no generator gradient reaches D's .grad
                        loss_g = g_loss(self.disc, pred, generator=gen("diffaug_g")) * cfg.lambda_gan
                    self.acc.backward(loss_g)
                preds.append(pred.detach())
                add(loss_g=loss_g.item())
            self._g_step()
            for i, (gen, _, x_tgt, _, _) in enumerate(prepared):
                with self._sync(self.disc, i == n - 1), self.acc.autocast():
                    loss_real = d_loss_real(self.disc, x_tgt, generator=gen("diffaug_real")) * cfg.lambda_gan
                    self.acc.backward(loss_real)
                add(loss_d_real=loss_real.item())
            self._d_step()
            for i, (gen, *_rest) in enumerate(prepared):
                with self._sync(self.disc, i == n - 1), self.acc.autocast():
                    loss_fake = (
                        d_loss_fake(self.disc, preds[i], generator=gen("diffaug_fake")) * cfg.lambda_gan
                    )
                    self.acc.backward(loss_fake)
                add(loss_d_fake=loss_fake.item())
            self._d_step()
            self.scheduler_d.step()
        self.scheduler.step()  # once per step, however many generator updates it took
        return sums

    @torch.no_grad()
    def validate_forward(self, lr: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
        g = self.acc.unwrap_model(self.gen)
        g.eval()
        try:
            m = self.model
            scores = m.de_net(lr.float())
            with m.modulated(scores):
                z = m.encode(lr_up, _opts())
                eps = m.predict_eps(z, m.config.guidance_scale)
                return m.decode(m.x0(z, eps), _opts()) * 2 - 1
        finally:
            g.train()

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        g = self.acc.unwrap_model(self.gen)
        d = self.acc.unwrap_model(self.disc)
        out = {f"gen.{n}": p for n, p in g.named_parameters() if p.requires_grad}
        out.update({f"gen.{n}": b for n, b in g.modulation.named_buffers(prefix="modulation")})
        out.update({f"disc.{n}": t for n, t in d.state_dict().items() if not n.startswith("backbone.")})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        g = self.acc.unwrap_model(self.gen)
        d = self.acc.unwrap_model(self.disc)
        gp = dict(g.named_parameters())
        gp.update(dict(g.modulation.named_buffers(prefix="modulation")))
        with torch.no_grad():
            for k, v in tensors.items():
                if k.startswith("gen."):
                    gp[k[4:]].copy_(v)
        d.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")}, strict=False)

    def optimizer_states(self) -> dict:
        return {"g": self.optimizer.state_dict(), "d": self.optimizer_d.state_dict(),
                "sched_g": self.scheduler.state_dict(), "sched_d": self.scheduler_d.state_dict()}  # fmt: skip

    def load_optimizer_states(self, states: dict, step: int) -> None:
        self.optimizer.load_state_dict(states["g"])
        self.optimizer_d.load_state_dict(states["d"])
        self.scheduler.load_state_dict(states["sched_g"])
        self.scheduler_d.load_state_dict(states["sched_d"])

    def export(self, folder: Path) -> Path:
        return self.model.current_weights().save(folder)


def _opts():
    from ..methods.base import RunOptions

    return RunOptions(vae_encoder_tile=1 << 16, vae_decoder_tile=1 << 16)
