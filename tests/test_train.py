"""Training on tiny models, on CPU: losses fall, stages freeze the right parameters, runs resume exactly,
the discriminator keeps its own gradients, and a finished run exports weights that `upscale` loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffsr.errors import ConfigError
from diffsr.train.config import build_config, parse_overrides, read_config_file
from diffsr.train.loop import list_checkpoints, run_training

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def hq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hq")
    yy, xx = np.mgrid[0:80, 0:80]
    for i in range(4):
        img = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (4 + i)), np.sin((xx + yy) / 7)], -1) * 100 + 128
        Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    (d / "0.txt").write_text("a striped test pattern")
    return d


@pytest.fixture(scope="module")
def de_net_path(tmp_path_factory):
    from diffsr.methods.s3diff import DegradationEstimator

    p = tmp_path_factory.mktemp("de") / "de_net.pth"
    torch.manual_seed(0)
    torch.save(DegradationEstimator().state_dict(), p)
    return p


def pisa_cfg(hq_dir, tiny_sd_dir, out, **kw):
    base = dict(data=[str(hq_dir)], output_dir=str(out), base=str(tiny_sd_dir), batch_size=2, crop_size=64,
                pix_steps=2, sem_steps=2, learning_rate=1e-3, lpips_pretrained=False, checkpoint_every=1,
                log_with="csv", log_every=1, validate_every=100)  # fmt: skip
    base.update(kw)
    return build_config("pisa", base)


def s3diff_cfg(hq_dir, tiny_sd_dir, de_net_path, out, **kw):
    base = dict(data=[str(hq_dir)], output_dir=str(out), base=str(tiny_sd_dir), de_net=str(de_net_path),
                batch_size=2, crop_size=64, max_steps=2, learning_rate=1e-3, lpips_pretrained=False,
                disc_backbone="vit_tiny_patch16_224", disc_pretrained=False, disc_layers=[0, 1, 2],
                disc_img_size=64, disc_head_channels=16, grad_accum=1, checkpoint_every=1, log_with="csv",
                log_every=1, validate_every=100)  # fmt: skip
    base.update(kw)
    return build_config("s3diff", base)


class _Acc:
    """Just enough of an Accelerator for driving a trainer step by step in-process."""

    def __new__(cls):
        from accelerate import Accelerator

        return Accelerator(cpu=True)


def fixed_batch(trainer, seed=0):
    from diffsr.degradations import degrade, get_preset, sample_params, upsample_to_hr

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    hr = torch.stack([torch.sin(xx / 4), torch.cos(yy / 5), torch.sin((xx - yy) / 6)])[None].repeat(
        2, 1, 1, 1
    )
    hr = (hr * 0.4 + 0.5).clamp(0, 1)
    cfg = get_preset(trainer.cfg.degradation)
    lr = degrade(hr, sample_params(cfg, 2, g), cfg)
    return {"hr": hr * 2 - 1, "lr": lr, "lr_up": upsample_to_hr(lr, 4) * 2 - 1, "caption": ["", "stripes"]}


def gen_for(step):
    return lambda kind: torch.Generator().manual_seed(hash((kind, step)) % (2**31))


# ---------------------------------------------------------------- configuration
def test_config_layers_and_errors(tmp_path, hq_dir):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"pix_steps": 10, "sem_steps": 5, "learning_rate": 1e-4}))
    cfg = build_config("pisa", {"data": [str(hq_dir)], "output_dir": "x"}, read_config_file(f),
                       parse_overrides(["batch_size=3", "lambda-csd=0.5", "gradient_checkpointing=true"]))  # fmt: skip
    assert (cfg.pix_steps, cfg.sem_steps, cfg.max_steps) == (10, 5, 15)
    assert cfg.batch_size == 3 and cfg.lambda_csd == 0.5 and cfg.gradient_checkpointing is True
    assert (
        cfg.lambda_lpips == 2.0 and cfg.csd_cfg == 7.5 and cfg.null_text_ratio == 0.5
    )  # the authors' defaults
    with pytest.raises(ConfigError, match="unknown pisa training setting 'lamda_csd'"):
        build_config("pisa", {"data": ["x"], "output_dir": "x", "lamda_csd": 1})
    with pytest.raises(ConfigError, match="batch_size: 'two' is not a valid int"):
        build_config("pisa", {"data": ["x"], "output_dir": "x"}, parse_overrides(["batch_size=two"]))
    with pytest.raises(ConfigError, match="max_steps=7 must equal"):
        build_config("pisa", {"data": ["x"], "output_dir": "x", "max_steps": 7})
    s3 = build_config("s3diff", {"data": ["x"], "output_dir": "x"})
    assert (s3.lambda_l2, s3.lambda_lpips, s3.lambda_gan, s3.neg_prob, s3.learning_rate) == (
        2.0,
        5.0,
        0.5,
        0.05,
        2e-5,
    )
    # DINO's get_intermediate_layers(n=8) picked at [0, 4, -1]: blocks 4, 8, 11; 4 accumulation steps
    assert s3.disc_layers == [4, 8, 11] and s3.degradation == "s3diff"
    assert (s3.grad_accum, s3.disc_head_channels, s3.disc_diffaug) == (4, 128, True)


# ---------------------------------------------------------------- PiSA-SR
@pytest.fixture
def pisa_trainer(hq_dir, tiny_sd_dir, tmp_path):
    from diffsr.train.pisa import PisaTrainer

    t = PisaTrainer(pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "run", learning_rate=3e-3))
    t.setup(_Acc())
    return t


def test_pisa_stage_switch_freezes_exactly(pisa_trainer):
    t = pisa_trainer
    t.on_step(0)
    named = dict(t.base_unet.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".pix." in n for n in trainable)
    assert len(trainable) == 2 * len(t.targets)
    batch = fixed_batch(t)
    t.train_step(batch, 0, gen_for(0))
    assert all(p.grad is None for p in named.values())  # zeroed to None after the update
    t.on_step(2)  # pix_steps = 2: stage 2
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert all(".lora_" in n and ".sem." in n for n in trainable) and len(trainable) == 2 * len(t.targets)
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(named[n]) for n in trainable}  # the optimizer holds the semantic set only
    pix_before = {n: p.detach().clone() for n, p in named.items() if ".pix." in n}
    for s in range(2, 4):
        t.train_step(batch, s, gen_for(s))
    assert all(torch.equal(named[n], v) for n, v in pix_before.items())  # frozen pixel LoRA did not drift
    assert any(not torch.equal(p, 0 * p) for n, p in named.items() if ".lora_B.sem." in n)  # sem trained


def test_pisa_losses_fall_in_each_stage(pisa_trainer):
    """Stage 1: L2; stage 2: L2 + LPIPS (CSD's value is a score-distillation surrogate, not an objective
    that must fall on a fixed batch, so it is switched off here; its gradient is tested in test_train_losses)."""
    t = pisa_trainer
    t.cfg.lambda_csd = 0.0
    batch = fixed_batch(t)
    for stage_start in (0, 2):
        t.on_step(stage_start)
        losses = [t.train_step(batch, stage_start, gen_for(0))["loss"] for _ in range(6)]
        assert losses[-1] < losses[0], (stage_start, losses)


def test_pisa_csd_only_in_stage_2(pisa_trainer, monkeypatch):
    import diffsr.train.losses as losses

    calls = []
    real = losses.csd_loss
    monkeypatch.setattr(losses, "csd_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = pisa_trainer
    batch = fixed_batch(t)
    t.on_step(0)
    logs1 = t.train_step(batch, 0, gen_for(0))
    assert calls == [] and "loss_csd" not in logs1 and "loss_lpips" not in logs1
    t.on_step(2)
    logs2 = t.train_step(batch, 2, gen_for(2))
    assert calls == [1] and {"loss_csd", "loss_lpips", "loss_l2"} <= set(logs2)


def test_pisa_resume_equals_uninterrupted_and_exports(hq_dir, tiny_sd_dir, tmp_path, capsys):
    full = run_training(
        _trainer(pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "a", sem_steps=3)), log=lambda s: None
    )
    cfg_b = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "b", sem_steps=3)
    part = run_training(_trainer(cfg_b), log=lambda s: None, stop_after=3)  # "killed" after step 3
    assert part.name == "step-0000003"
    with pytest.raises(ConfigError, match="pass resume=True to continue"):
        run_training(_trainer(cfg_b), log=lambda s: None)
    resumed = run_training(_trainer(cfg_b), resume=True, log=lambda s: None)

    assert resumed.name == "final"
    assert_same_training(tmp_path / "a", tmp_path / "b", final=5, killed=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == [
        "step-0000003",
        "step-0000004",
        "step-0000005",
    ]
    rows = (tmp_path / "a" / "logs.csv").read_text().splitlines()
    assert rows[0] == "step,name,value" and {r.split(",")[0] for r in rows[1:]} == {"1", "2", "3", "4", "5"}
    # the export is what `diffsr upscale --weights` loads
    from diffsr.cli import main

    img = tmp_path / "x.png"
    Image.new("RGB", (12, 10), (90, 120, 60)).save(img)
    assert main(["upscale", str(img), "-o", str(tmp_path / "up"), "--base", str(tiny_sd_dir), "--weights",
                 str(full), "-q"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "up" / "x.png").size == (48, 40)


def assert_same_training(run_a: Path, run_b: Path, final: int, killed: int) -> None:
    """The resumed run's final checkpoint equals the uninterrupted run's up to CPU float noise: BLAS
    results depend on memory alignment, so two processes do not agree bit for bit, and Adam turns
    1-ulp gradient differences near zero into small steps. A wrong resume (optimizer state, data order,
    random draws) moves the weights by the size of an update; float noise by a fraction of it. Measured
    on this model: correct resume 5-10 %, resume without the optimizer state ~60 %."""
    name = lambda s: f"checkpoints/step-{s:07d}/weights.safetensors"  # noqa: E731
    full, resumed, at_kill = (
        load_file(r / name(s)) for r, s in ((run_a, final), (run_b, final), (run_b, killed))
    )
    keys = sorted(full)
    assert keys == sorted(resumed) == sorted(at_kill)
    diff = torch.cat([(full[k] - resumed[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(full[k] - at_kill[k]).flatten() for k in keys]).norm()
    assert moved > 0
    assert diff < 0.25 * moved, (diff.item(), moved.item())


def _trainer(cfg):
    from diffsr.train.loop import build_trainer

    return build_trainer(cfg)


def test_validation_writes_images_and_metrics(hq_dir, tiny_sd_dir, tmp_path):
    cfg = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "v", pix_steps=1, sem_steps=0, max_steps=1, val_data=str(hq_dir),
                   val_count=2, val_crop=64, validate_every=1)  # fmt: skip
    run_training(_trainer(cfg), log=lambda s: None)
    folder = tmp_path / "v" / "val" / "step-0000001"
    imgs = sorted(p.name for p in folder.iterdir())
    assert imgs == ["0.png", "0_lr-sr-hr.png", "1.png", "1_lr-sr-hr.png"]
    assert Image.open(folder / "0.png").size == (64, 64)
    strip = np.asarray(Image.open(folder / "0_lr-sr-hr.png"))
    assert strip.shape == (64, 192, 3)
    assert np.array_equal(strip[:, 64:128], np.asarray(Image.open(folder / "0.png")))  # the SR in the middle
    log = (tmp_path / "v" / "logs.csv").read_text()
    assert "val/psnr" in log and "val/ssim" in log


# ---------------------------------------------------------------- S3Diff
@pytest.fixture
def s3_trainer(hq_dir, tiny_sd_dir, de_net_path, tmp_path):
    from diffsr.train.s3diff import S3DiffTrainer

    t = S3DiffTrainer(s3diff_cfg(hq_dir, tiny_sd_dir, de_net_path, tmp_path / "s3", learning_rate=3e-3))
    t.setup(_Acc())
    return t


def test_s3diff_trainable_set_and_frozen_estimator(s3_trainer):
    g = s3_trainer.acc.unwrap_model(s3_trainer.gen)
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    assert any(".lora_A.default." in n for n in trainable) and any(
        ".lora_B.vae_skip." in n for n in trainable
    )
    assert {"unet.conv_in.weight", "unet.conv_in.bias"} <= trainable
    assert any(n.startswith("modulation.unet_fuse_mlp") for n in trainable)
    assert not any("base_layer" in n or n.startswith("unet.time_embedding") for n in trainable)
    assert not any(p.requires_grad for p in s3_trainer.model.de_net.parameters())
    de_before = {k: v.clone() for k, v in s3_trainer.model.de_net.state_dict().items()}
    s3_trainer.train_step(fixed_batch(s3_trainer), 0, gen_for(0))
    assert all(torch.equal(v, s3_trainer.model.de_net.state_dict()[k]) for k, v in de_before.items())


def test_s3diff_generator_step_leaves_discriminator_grads(s3_trainer, monkeypatch):
    t = s3_trainer
    d = t.acc.unwrap_model(t.disc)
    seen = []
    real_g_step = t._g_step

    def g_step():
        seen.append([p.grad is None for p in d.trainable_parameters()])  # after the generator's backward
        real_g_step()

    monkeypatch.setattr(t, "_g_step", g_step)
    heads_before = [p.detach().clone() for p in d.trainable_parameters()]
    t.train_step(fixed_batch(t), 0, gen_for(0))
    assert len(seen) == 2 and all(all(flags) for flags in seen)  # no .grad on D after either generator update
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, d.trainable_parameters(), strict=True))


def test_s3diff_reconstruction_loss_falls(s3_trainer):
    t = s3_trainer
    batch = fixed_batch(t)
    t.cfg.lambda_gan = 0.0
    t.cfg.neg_prob = 0.0
    losses = [t.train_step(batch, 0, gen_for(0))["loss_l2"] for _ in range(6)]
    assert losses[-1] < losses[0], losses


def test_s3diff_online_negatives_use_lr_target(s3_trainer, monkeypatch):
    import torch.nn.functional as F

    t = s3_trainer
    t.cfg.neg_prob = 1.0
    t.cfg.lambda_gan = 0.0
    targets = []
    real_mse = F.mse_loss

    def spy(pred, target, **kw):
        targets.append(target)
        return real_mse(pred, target, **kw)

    monkeypatch.setattr(F, "mse_loss", spy)
    batch = fixed_batch(t)
    t.train_step(batch, 0, gen_for(0))
    torch.testing.assert_close(targets[0], batch["lr_up"].float())


def test_s3diff_resume_equals_uninterrupted(hq_dir, tiny_sd_dir, de_net_path, tmp_path):
    from diffsr.methods.s3diff import S3DiffWeights

    full = run_training(_trainer(s3diff_cfg(hq_dir, tiny_sd_dir, de_net_path, tmp_path / "a", max_steps=3)),
                        log=lambda s: None)  # fmt: skip
    cfg_b = s3diff_cfg(hq_dir, tiny_sd_dir, de_net_path, tmp_path / "b", max_steps=3)
    run_training(_trainer(cfg_b), log=lambda s: None, stop_after=1)
    run_training(_trainer(cfg_b), resume=True, log=lambda s: None)
    assert_same_training(tmp_path / "a", tmp_path / "b", final=3, killed=1)
    w = S3DiffWeights.load(full)
    assert w.de_net is not None and "conv_in.weight" in w.unet


@pytest.mark.slow
def test_cli_train_tensorboard_bf16_gradient_checkpointing(hq_dir, tiny_sd_dir, tmp_path):
    """Through the CLI in a fresh process (accelerate's precision is fixed per process)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "tb"
    cmd = [sys.executable, "-m", "diffsr", "train", "pisa", "--data", str(hq_dir), "-o", str(out), "--base",
           str(tiny_sd_dir), "--pix-steps", "1", "--sem-steps", "1", "--batch-size", "2", "--crop-size", "64",
           "--mixed-precision", "bf16", "--gradient-checkpointing", "--log-with", "tensorboard",
           "--set", "lpips_pretrained=false"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("final")
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"


def test_csd_leaves_trainability_alone(pisa_trainer):
    """CSD bypasses the LoRA layers for its frozen-UNet pass; the stage's trainable set must survive it."""
    t = pisa_trainer
    t.on_step(2)
    before = {n for n, p in t.base_unet.named_parameters() if p.requires_grad}
    t.train_step(fixed_batch(t), 2, gen_for(2))
    assert {n for n, p in t.base_unet.named_parameters() if p.requires_grad} == before


def _csv_rows(run: Path, name: str) -> list[tuple[int, float]]:
    rows = [r.split(",") for r in (run / "logs.csv").read_text().splitlines()[1:]]
    return [(int(r[0]), float(r[2])) for r in rows if r[1] == name]


def test_s3diff_schedule_steps_once_per_step_and_resume_logs_no_duplicates(
    hq_dir, tiny_sd_dir, de_net_path, tmp_path
):
    """The generator updates twice per step (reconstruction, then GAN); its learning-rate schedule
    advances once. A resumed run drops the log rows the killed run wrote after its checkpoint."""
    cfg = s3diff_cfg(hq_dir, tiny_sd_dir, de_net_path, tmp_path / "r", max_steps=4, lr_scheduler="linear",
                     checkpoint_every=2)  # fmt: skip
    run_training(_trainer(cfg), log=lambda s: None, stop_after=3)  # checkpoint at 2, "killed" after 3
    assert [s for s, _ in _csv_rows(tmp_path / "r", "lr")] == [1, 2, 3]
    (tmp_path / "r" / "checkpoints" / ".step-0000004.tmp-999").mkdir()  # a save interrupted by a kill
    run_training(_trainer(cfg), resume=True, log=lambda s: None)
    rows = _csv_rows(tmp_path / "r", "lr")
    assert [s for s, _ in rows] == [1, 2, 3, 4]  # step 3 logged once, by the resumed run
    assert [v for _, v in rows] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-12)
    assert not list((tmp_path / "r" / "checkpoints").glob(".step-*"))
    mode = (tmp_path / "r" / "final" / "model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_fp16_on_cpu_is_refused_up_front(hq_dir, tiny_sd_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "f", mixed_precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run_training(_trainer(cfg), log=lambda s: None)


def test_ema_recurrence_checkpointed_and_exported(hq_dir, tiny_sd_dir, tmp_path):
    from diffsr.methods.pisa import PisaWeights

    d = 0.5
    cfg = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "e", pix_steps=2, sem_steps=1, ema_decay=d, keep_last=10)
    final = run_training(_trainer(cfg), log=lambda s: None)
    ck = lambda s, f: load_file(tmp_path / "e" / "checkpoints" / f"step-{s:07d}" / f)  # noqa: E731
    ema2, ema3, w3 = ck(2, "ema.safetensors"), ck(3, "ema.safetensors"), ck(3, "weights.safetensors")
    for k in w3:  # avg_3 = d·avg_2 + (1 − d)·w_3
        torch.testing.assert_close(ema3[k], d * ema2[k] + (1 - d) * w3[k].float(), atol=1e-7, rtol=1e-6)
    exported = PisaWeights.load(final)
    key = next(k for k in w3 if ".lora_B.sem." in k)
    assert not torch.equal(ema3[key], w3[key])  # the average is not the last weights …
    torch.testing.assert_close(exported.sem[key], ema3[key])  # … and the export holds the average


def test_sigterm_checkpoints_and_resume_from_a_chosen_checkpoint(hq_dir, tiny_sd_dir, tmp_path):
    import os
    import signal

    from diffsr.train.loop import TrainingStopped

    cfg = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "t", checkpoint_every=100, num_workers=1)
    trainer = _trainer(cfg)
    on_step = trainer.on_step

    def preempt(step):
        on_step(step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2's work

    trainer.on_step = preempt
    with pytest.raises(TrainingStopped) as info:
        run_training(trainer, log=lambda s: None)
    assert info.value.checkpoint.name == "step-0000002"
    assert [p.name for p in list_checkpoints(tmp_path / "t")] == ["step-0000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    out = run_training(_trainer(cfg), resume=info.value.checkpoint, log=lambda s: None)
    assert out.name == "final"
    with pytest.raises(ConfigError, match="not a diffsr checkpoint"):
        run_training(_trainer(cfg), resume=tmp_path / "t" / "final", log=lambda s: None)


def test_micro_batches_built_in_worker_processes_equal_in_process(hq_dir, tiny_sd_dir, tmp_path):
    import os

    from diffsr.train.data import HQImageDataset
    from diffsr.train.loop import MicroBatches

    cfg = pisa_cfg(hq_dir, tiny_sd_dir, tmp_path / "w", pix_steps=3, sem_steps=0, batch_size=1)

    class Traced(MicroBatches):
        def __getitem__(self, k):
            return {**super().__getitem__(k), "pid": os.getpid()}

    def batches(workers: int, start: int) -> list[dict]:
        ds = HQImageDataset(
            cfg.data, crop_size=cfg.crop_size, min_size=cfg.min_size, hflip=cfg.hflip, seed=cfg.seed
        )
        mb = Traced(ds, cfg, rank=0, world=1, per_epoch=len(ds) // cfg.batch_size)
        return list(mb.loader(start=start, num_workers=workers))

    here, there = batches(0, 0), batches(2, 0)
    assert len(here) == len(there) == 3
    assert all(b["pid"] == os.getpid() for b in here) and all(b["pid"] != os.getpid() for b in there)
    for a, b in zip(here, there, strict=True):
        for k in ("hr", "lr", "lr_up"):
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
        assert a["caption"] == b["caption"]
    resumed = batches(2, 1)  # a resumed run starts at its own micro-batch
    torch.testing.assert_close(resumed[0]["lr"], here[1]["lr"], atol=1e-6, rtol=0)


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """fp16 training's loss scale is saved and restored (a resumed run would otherwise restart it)."""
    from diffsr.train.loop import load_checkpoint, save_checkpoint

    class Tiny:  # just what the checkpoint functions use
        cfg = build_config("pisa", dict(data=["x"], output_dir=str(tmp_path)))

        def state_tensors(self):
            return {"w": torch.ones(2)}

        def optimizer_states(self):
            return {}

        def load_state_tensors(self, tensors):
            self.loaded = tensors

        def load_optimizer_states(self, states, step):
            pass

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=37.0)
    ckpt = save_checkpoint(Tiny(), tmp_path, 5, keep_last=2, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    assert load_checkpoint(Tiny(), ckpt, fresh) == 5
    assert fresh.get_scale() == 37.0 and fresh.get_growth_interval() == 7
