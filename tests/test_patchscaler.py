"""PatchScaler end to end on tiny random models: inference, the texture prompt computed once per patch,
device split, weights round trip, CLI/API/bench; training, build-rtm and the texture classifier."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.cli import main
from diffsr.methods.patchscaler.dit import PRESETS
from diffsr.methods.patchscaler.model import (
    PatchScaler,
    PatchScalerConfig,
    load_weights,
    random_nets,
    save_weights,
)
from diffsr.synthetic import random_sd_parts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(dit=asdict(PRESETS["tiny"]), grm_widths=(16, 32, 64), grm_blocks=1)


@pytest.fixture
def ps():
    cfg = PatchScalerConfig(**TINY)
    return PatchScaler.from_parts(
        random_sd_parts("tiny", seed=0, text_encoder=False), cfg, random_nets(cfg, seed=1)
    )


@pytest.fixture(scope="module")
def ps_dir(tmp_path_factory):
    cfg = PatchScalerConfig(**TINY)
    return save_weights(tmp_path_factory.mktemp("ps") / "weights", cfg, random_nets(cfg, seed=1))


def test_paper_values_in_config():
    c = PatchScalerConfig()
    assert (c.patch, c.thresholds, c.taus, c.steps, c.color_fix) == (
        16,
        (0.95, 0.75),
        (400, 700, 1000),
        (8, 14, 20),
        "wavelet",
    )
    assert c.dit_config().hidden == 768 and c.dit_config().patch_size == 2  # DiT-B/2 (our choice, D8)
    assert c.alphas_cumprod()[399].sqrt().item() == pytest.approx(0.442, abs=1e-3)


@pytest.mark.parametrize("size", [(13, 17), (40, 56), (5, 70)])
def test_restore_is_exactly_4x(ps, size):
    y, stats = ps.restore(torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)))
    assert (
        y.shape == (1, 3, 4 * size[0], 4 * size[1])
        and torch.isfinite(y).all()
        and 0 <= y.min()
        and y.max() <= 1
    )
    assert stats["patches"] == sum(stats["groups"].values()) >= 1


@pytest.mark.parametrize("steps", [(8, 14, 20), (20, 20, 20), (1, 2, 3)])
def test_texture_prompt_once_per_patch_whatever_n(steps):
    cfg = PatchScalerConfig(**TINY, steps=steps)
    model = PatchScaler.from_parts(random_sd_parts("tiny", text_encoder=False), cfg, random_nets(cfg, seed=1))
    calls = {"encoder": 0, "kv": 0}
    model.nets.texture_encoder.register_forward_hook(
        lambda m, i, o: calls.__setitem__("encoder", calls["encoder"] + i[0].shape[0])
    )
    real = model.nets.dit.prompt_cache

    def counted(prompt):
        calls["kv"] += prompt.shape[0]
        return real(prompt)

    model.nets.dit.prompt_cache = counted
    lr = torch.rand(1, 3, 40, 64)
    _, stats = model.restore(lr, chunk_size=2)
    m = stats["patches"]
    assert calls == {"encoder": m, "kv": m} and stats["texture_prompts"] == m
    assert stats["denoiser_calls"] >= max(steps)  # many steps, prompts still once per patch


def test_group_thresholds_change_the_work(ps):
    lr = torch.rand(1, 3, 40, 64, generator=torch.Generator().manual_seed(2))
    a = ps.window_confidence(lr)
    _, all_simple = ps.restore(lr, thresholds=(float(a.min()) - 1e-6, max(float(a.min()) - 2e-6, 0.0)))
    _, all_hard = ps.restore(lr, thresholds=(1.0, float(a.max()) + 1e-6 if a.max() < 1 else 1.0 - 1e-9))
    m = all_simple["patches"]
    assert (
        all_simple["groups"] == {"simple": m, "medium": 0, "hard": 0}
        and all_simple["patch_evaluations"] == 8 * m
    )
    assert all_hard["groups"]["hard"] == m and all_hard["patch_evaluations"] == 20 * m
    assert all_simple["speedup"] == pytest.approx(20 / 8)
    _, unified = ps.restore(lr, unified=True)
    assert unified["patch_evaluations"] == 20 * m and unified["denoiser_calls"] == 20


def test_two_device_split_equals_one_device(ps):
    lr = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    a = ps.window_confidence(lr)
    thr = (torch.quantile(a, 0.6).item(), torch.quantile(a, 0.3).item())  # all three groups present
    y1, s1 = ps.restore(lr, thresholds=thr, seed=5)
    y2, s2 = ps.restore(
        lr, thresholds=thr, seed=5, devices={"hard": "cpu:0", "simple": "cpu:1", "medium": "cpu:1"}
    )
    assert min(s1["groups"].values()) > 0
    assert torch.equal(y1, y2) and s2["workers"] == {"cpu:0": ["hard"], "cpu:1": ["simple", "medium"]}
    y3, _ = ps.restore(lr, thresholds=thr, seed=6)
    assert not torch.equal(y1, y3)  # the seed sets the global noise map


def test_weights_round_trip(ps_dir, ps):
    cfg, nets = load_weights(ps_dir)
    assert cfg == PatchScalerConfig(**TINY)
    model = PatchScaler.from_parts(random_sd_parts("tiny", seed=0, text_encoder=False), cfg, nets)
    lr = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    for part in ("grm", "dit", "texture_encoder", "classifier"):
        a, b = getattr(ps.nets, part).state_dict(), getattr(nets, part).state_dict()
        assert all(torch.equal(a[k], b[k].to(a[k].device)) for k in a), part
    assert torch.equal(ps.nets.rtm.keys, model.nets.rtm.keys)
    assert torch.equal(ps.nets.rtm.values, model.nets.rtm.values)
    # same weights; two model instances agree to float noise (BLAS results depend on memory alignment)
    torch.testing.assert_close(model.restore(lr)[0], ps.restore(lr)[0], atol=1e-5, rtol=0)


def test_cli_and_bench(ps_dir, tmp_path, tiny_sd_dir, capsys):
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)).save(img)
    args = ["upscale", str(img), "-o", str(tmp_path / "out"), "--method", "patchscaler", "--weights", str(ps_dir),
            "--base", str(tiny_sd_dir), "-q", "-v"]  # fmt: skip
    assert main(args) == 0
    assert Image.open(tmp_path / "out" / "in.png").size == (112, 80)
    err = capsys.readouterr().err
    assert "denoiser_calls=" in err and "patch_evaluations=" in err
    assert (
        main(
            [
                *args[:3],
                str(tmp_path / "out2"),
                *args[4:],
                "--group-devices",
                "hard=cpu:0,simple=cpu:1,medium=cpu:1",
            ]
        )
        == 0
    )
    assert main(["upscale", str(img), "-o", str(tmp_path / "o3"), "--method", "pisa", "--unified"]) == 2
    assert main(["bench", "--method", "patchscaler", "--size", "tiny", "--input", "16", "--warmup", "0", "--repeats",
                 "1", "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "PGS, split 50/30/20 %" in out and "unified" in out and "patch_evaluations=" in out


# ---------------------------------------------------------------- texture memory and training
@pytest.fixture(scope="module")
def texture_memory(tmp_path_factory, tiny_sd_dir):
    """A tiny texture classifier trained on procedural textures, and an RTM built with build-rtm."""
    from diffsr.methods.patchscaler.procedural import TEXTURE_KINDS, procedural_textures

    root = tmp_path_factory.mktemp("tm")
    cls_dir = root / "classifier"
    assert main(["train", "texture-classifier", "--procedural", "-o", str(cls_dir), "--base", str(tiny_sd_dir),
                 "--steps", "40", "--batch-size", "12", "--device", "cpu"]) == 0  # fmt: skip
    imgs = root / "imgs"
    imgs.mkdir()
    g = torch.Generator().manual_seed(0)
    for kind in TEXTURE_KINDS:
        for i, t in enumerate(procedural_textures(kind, 2, 256, generator=g)):
            Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(imgs / f"{kind}{i}.png")
    rtm = root / "rtm"
    assert main(["build-rtm", str(imgs), "-o", str(rtm), "--classifier", str(cls_dir), "--base", str(tiny_sd_dir),
                 "--pool", "48", "--size", "16", "--device", "cpu"]) == 0  # fmt: skip
    return rtm


def test_build_rtm_is_deterministic(texture_memory, tmp_path, tiny_sd_dir):
    from diffsr.methods.patchscaler.memory import load_texture_memory

    classifier, rtm = load_texture_memory(texture_memory)
    assert len(rtm) == 16 and rtm.values.shape[1:] == (4, 16, 16)
    torch.testing.assert_close(rtm.keys.norm(dim=1), torch.ones(16))
    again = tmp_path / "again"
    imgs = texture_memory.parent / "imgs"
    assert main(["build-rtm", str(imgs), "-o", str(again), "--classifier", str(texture_memory / "classifier"),
                 "--base", str(tiny_sd_dir), "--pool", "48", "--size", "16", "--device", "cpu"]) == 0  # fmt: skip
    assert torch.equal(load_texture_memory(again)[1].keys, rtm.keys)


def test_train_patchscaler_phases_and_export(texture_memory, tmp_path, tiny_sd_dir):
    from diffsr.train.config import build_config
    from diffsr.train.loop import build_trainer, run_training

    hq = tmp_path / "hq"
    hq.mkdir()
    g = torch.Generator().manual_seed(1)
    from diffsr.methods.patchscaler.procedural import procedural_textures

    for i, t in enumerate(procedural_textures("stripes", 3, 160, generator=g)):
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(hq / f"{i}.png")
    cfg = build_config("patchscaler", dict(
        data=[str(hq)], output_dir=str(tmp_path / "run"), base=str(tiny_sd_dir), rtm=str(texture_memory),
        batch_size=1, crop_size=128, max_steps=3, grm_steps=2, dit_preset="tiny", grm_widths=[16, 32, 64],
        grm_blocks=1, texture_depth=1, learning_rate=1e-3, log_with="csv", log_every=1, checkpoint_every=3,
        lr_scheduler="linear", grm_eta_warmup=1, val_crop=128, val_count=2,
    ))  # fmt: skip
    trainer = build_trainer(cfg)
    final = run_training(trainer, log=lambda s: None)
    # η: calibrated on the held-out split at step 0 and once more after the warm-up (step 1), never per batch
    assert trainer.eta_calibrated_at == 1 and len(trainer.calibration_split) == 2
    etas = [float(r.split(",")[2]) for r in (tmp_path / "run" / "logs.csv").read_text().splitlines()[1:]
            if r.split(",")[1] == "eta"]  # fmt: skip
    assert len(etas) == 2 and etas[0] != etas[1] and etas[1] == pytest.approx(trainer.eta)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000003" / "optimizer.pt", weights_only=True)
    assert state["grm_eta"] == pytest.approx(trainer.eta)  # a resumed run keeps it
    from diffsr.degradations import upsample_to_hr

    errs = []
    with torch.no_grad():  # the median of e² = Σ_c (GRM(y_LR) − x_HR)², computed here by hand
        for _, hr, lr in trainer.calibration_split:
            enc = lambda x: trainer.vae.encode(x).latent_dist.mean * trainer.vae.config.scaling_factor  # noqa: E731
            y, _ = trainer.nets.grm(enc(upsample_to_hr(lr, 4) * 2 - 1))
            errs.append(((y - enc(hr * 2 - 1)) ** 2).sum(1).flatten())
    assert trainer.calibrate_eta() == pytest.approx(
        float(torch.quantile(torch.cat(errs).double(), 0.5)), rel=1e-6
    )
    assert trainer.phase == 2 and not any(p.requires_grad for p in trainer.nets.grm.parameters())
    log = (tmp_path / "run" / "logs.csv").read_text()
    assert "loss_grm" in log and "loss_diffusion" in log and "group_hard" in log
    rows = [r.split(",") for r in log.splitlines()[1:]]
    assert {r[0] for r in rows if r[1] == "loss_grm"} == {"1", "2"}  # the GRM loss only in phase 1
    lrs = [float(r[2]) for r in rows if r[1] == "lr"]  # one linear schedule over the run, across the switch
    assert lrs == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0], abs=1e-9)
    img = tmp_path / "x.png"
    Image.new("RGB", (16, 20), (40, 90, 200)).save(img)
    assert main(["upscale", str(img), "-o", str(tmp_path / "up"), "--method", "patchscaler", "--weights", str(final),
                 "--base", str(tiny_sd_dir), "-q"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "up" / "x.png").size == (64, 80)
