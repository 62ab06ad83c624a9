"""Training inputs and fidelity: real LR/HR pairs for training and validation, S3Diff's gradient
accumulation, weights found (or refused) before anything heavy starts, LPIPS in validation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr.errors import ConfigError, WeightsNotFoundError
from diffsr.train.config import build_config
from diffsr.train.data import PairedImageDataset, resolve_pairs
from diffsr.train.loop import build_trainer, run_training

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    h, w, c = a.shape
    return a.reshape(h // s, s, w // s, s, c).mean(axis=(1, 3))


def _write_pair(root: Path, name: str, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    lr = _block_mean(hr, 4)
    (root / "hr").mkdir(parents=True, exist_ok=True)
    (root / "lr").mkdir(parents=True, exist_ok=True)
    Image.fromarray(hr.astype(np.uint8)).save(root / "hr" / f"{name}.png")
    Image.fromarray(np.round(lr).astype(np.uint8)).save(root / "lr" / f"{name}.png")


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    """A `diffsr degrade`-style folder (lr/ and hr/), LR = 4×4 block means of the HR."""
    root = tmp_path_factory.mktemp("pairs")
    for i, (h, w) in enumerate([(96, 80), (128, 128), (40, 48), (88, 96)]):
        _write_pair(root, f"im{i}", h, w, seed=i)
    return root


def test_pair_sources_folders_lists_and_errors(pair_dir, tmp_path):
    pairs = resolve_pairs(pair_dir)
    assert [(lr.name, hr.name) for lr, hr in pairs] == [(f"im{i}.png", f"im{i}.png") for i in range(4)]
    assert all(lr.parent.name == "lr" and hr.parent.name == "hr" for lr, hr in pairs)
    lst = tmp_path / "pairs.txt"
    lst.write_text(f"# LR HR\n{pair_dir}/lr/im1.png  {pair_dir}/hr/im1.png\n\n")
    assert resolve_pairs(lst) == [(pair_dir / "lr" / "im1.png", pair_dir / "hr" / "im1.png")]
    lst.write_text(f"{pair_dir}/lr/im1.png\n")
    with pytest.raises(ConfigError, match=r"pairs.txt:1: a pair line is 'LR_PATH HR_PATH'"):
        resolve_pairs(lst)
    lst.write_text("lr/nope.png hr/nope.png\n")
    with pytest.raises(ConfigError, match="nope.png does not exist"):
        resolve_pairs(lst)
    lonely = tmp_path / "lonely"
    _write_pair(lonely, "a", 16, 16, 0)
    (lonely / "lr" / "a.png").rename(lonely / "lr" / "b.png")
    with pytest.raises(ConfigError, match="no partner"):
        resolve_pairs(lonely)
    with pytest.raises(ConfigError, match="lr/ and hr/"):
        resolve_pairs(lonely / "hr")


def test_paired_crops_stay_aligned_padded_and_flipped(pair_dir):
    ds = PairedImageDataset(pair_dir, crop_size=64, scale=4, seed=3)
    seen_flip = False
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            it = ds[i]
            hr, lr = it["hr"].permute(1, 2, 0).numpy(), it["lr"].permute(1, 2, 0).numpy()
            assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
            # the LR crop is the block mean of the HR crop (up to the LR's 8-bit rounding), padding included
            np.testing.assert_allclose(_block_mean(hr, 4), lr, atol=0.5 / 255 + 1e-6)
            seen_flip |= not np.array_equal(it["hr"], PairedImageDataset(pair_dir, crop_size=64, hflip=False,
                                                                         seed=3).__getitem__(i)["hr"])  # fmt: skip
    assert seen_flip
    ds.set_epoch(0)
    a, b = ds[1], ds[1]
    assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])  # (seed, epoch, index) only
    with pytest.raises(ConfigError, match="multiple of the pair scale"):
        PairedImageDataset(pair_dir, crop_size=66, scale=4)


def test_mismatched_pair_is_skipped_with_a_warning(tmp_path):
    _write_pair(tmp_path, "good", 64, 64, 1)
    Image.new("RGB", (20, 20)).save(tmp_path / "lr" / "bad.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "hr" / "bad.png")
    ds = PairedImageDataset(tmp_path, crop_size=32, scale=4)
    with pytest.warns(RuntimeWarning, match=r"bad.png: HR 64x64 is not 4x its LR"):
        item = ds[0]  # "bad" sorts first: served by the next usable pair
    assert item["path"].endswith("good.png")


def test_training_and_validation_on_real_pairs(pair_dir, tiny_sd_dir, tmp_path):
    cfg = build_config("pisa", dict(
        pairs=[str(pair_dir)], val_pairs=str(pair_dir), output_dir=str(tmp_path / "run"), base=str(tiny_sd_dir),
        batch_size=2, crop_size=64, val_crop=64, val_count=2, pix_steps=1, sem_steps=1, lpips_pretrained=False,
        log_with="csv", log_every=1, validate_every=2, checkpoint_every=2,
    ))  # fmt: skip
    run_training(build_trainer(cfg), log=lambda s: None)
    rows = [r.split(",") for r in (tmp_path / "run" / "logs.csv").read_text().splitlines()[1:]]
    names = {r[1] for r in rows if r[0] == "2"}
    assert {"val/psnr", "val/ssim", "val/lpips"} <= names  # a perceptual metric next to PSNR/SSIM
    lpips_val = next(float(r[2]) for r in rows if r[1] == "val/lpips")
    assert np.isfinite(lpips_val) and lpips_val > 0
    strip = Image.open(tmp_path / "run" / "val" / "step-0000002" / "im0_lr-sr-hr.png")
    assert strip.size == (3 * 64, 64)
    with pytest.raises(ConfigError, match="not both"):
        build_config("pisa", dict(pairs=["x"], data=["y"], output_dir="o"))
    with pytest.raises(ConfigError, match="needs data"):
        build_config("pisa", dict(output_dir="o"))


# ------------------------------------------------------------------------------ S3Diff accumulation
def _s3_trainer(hq, tiny_sd_dir, de_net, out, **kw):
    from accelerate import Accelerator

    from diffsr.train.s3diff import S3DiffTrainer

    cfg = build_config("s3diff", dict(
        data=[str(hq)], output_dir=str(out), base=str(tiny_sd_dir), de_net=str(de_net), batch_size=2,
        crop_size=64, max_steps=2, learning_rate=1e-3, lpips_pretrained=False, disc_backbone="vit_tiny_patch16_224",
        disc_pretrained=False, disc_layers=[0, 1, 2], disc_img_size=64, disc_head_channels=8,
        sample_posterior=False, neg_prob=0.0, **kw,
    ))  # fmt: skip
    torch.manual_seed(0)
    t = S3DiffTrainer(cfg)
    t.setup(Accelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum))
    return t


def _batch(seed: int, b: int = 2) -> dict:
    from diffsr.degradations import get_preset, training_inputs

    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, 64, 64, generator=g)
    lr, up = training_inputs(hr, get_preset("s3diff"), g)
    return {"hr": hr * 2 - 1, "lr": lr, "lr_up": up * 2 - 1, "caption": [""] * b}


def test_s3diff_gradient_accumulation_averages_each_update(tiny_sd_dir, tmp_path):
    """Two micro-batches of 2, accumulated, make the same generator update as one batch of 4."""
    from diffsr.methods.s3diff import DegradationEstimator

    de = tmp_path / "de.pth"
    torch.manual_seed(0)
    torch.save(DegradationEstimator().state_dict(), de)
    hq = tmp_path / "hq"
    hq.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(hq / f"{i}.png")
    b1, b2 = _batch(1), _batch(2)
    both = {k: torch.cat([b1[k], b2[k]]) if torch.is_tensor(b1[k]) else b1[k] + b2[k] for k in b1}
    gen = lambda kind: torch.Generator().manual_seed(7)  # noqa: E731
    grads = []

    def capture(t):
        step = t._g_step

        def g_step():  # the accumulated gradient the update applies (Adam's first step hides its scale)
            grads.append({n: p.grad.clone() for n, p in t.acc.unwrap_model(t.gen).named_parameters()
                          if p.grad is not None})  # fmt: skip
            step()

        t._g_step = g_step
        return t

    acc = capture(_s3_trainer(hq, tiny_sd_dir, de, tmp_path / "a", grad_accum=2, lambda_gan=0.0))
    logs = acc.train_update([b1, b2], 0, lambda i: gen)
    one = capture(_s3_trainer(hq, tiny_sd_dir, de, tmp_path / "b", grad_accum=1, lambda_gan=0.0))
    ref = one.train_step(both, 0, gen)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:  # equal up to float summation order (a sum instead of a mean would be off by 2x)
        assert (grads[0][k] - grads[1][k]).norm() <= 2e-3 * grads[1][k].norm() + 1e-9, k
    wa, wb = acc.state_tensors(), one.state_tensors()
    changed = [k for k in wa if k.startswith("gen.")]
    assert changed and all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in changed)
    assert logs["loss_l2"] == pytest.approx(ref["loss_l2"], rel=1e-4)  # logged as the mean over micro-batches

    # with the GAN term: each of the four optimizers' updates happens once per step, whatever grad_accum
    gan = _s3_trainer(hq, tiny_sd_dir, de, tmp_path / "c", grad_accum=2)
    calls = {"g": 0, "d": 0}
    g_step, d_step = gan._g_step, gan._d_step
    gan._g_step = lambda: (calls.__setitem__("g", calls["g"] + 1), g_step())[1]
    gan._d_step = lambda: (calls.__setitem__("d", calls["d"] + 1), d_step())[1]
    logs = gan.train_update([b1, b2], 0, lambda i: gen)
    assert calls == {"g": 2, "d": 2} and {"loss_g", "loss_d_real", "loss_d_fake"} <= set(logs)
    assert gan.scheduler.last_epoch == 1 and gan.scheduler_d.last_epoch == 1


# ------------------------------------------------------------------------------ weights up front
def test_missing_lpips_weights_fail_in_seconds_naming_the_flag(tiny_sd_dir, tmp_path, monkeypatch):
    import torchvision

    from diffsr.train import preflight

    monkeypatch.setenv("DIFFSR_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    hq = tmp_path / "hq"
    hq.mkdir()
    Image.new("RGB", (64, 64)).save(hq / "a.png")
    kw = dict(
        data=[str(hq)], output_dir=str(tmp_path / "run"), base=str(tiny_sd_dir), pix_steps=1, sem_steps=0
    )
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=r"lpips_weights=FILE .*vgg16-397923af.pth"):
        run_training(build_trainer(build_config("pisa", kw)), log=lambda s: None)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "run").exists()  # before anything was built
    with pytest.raises(WeightsNotFoundError, match="lpips_weights=/nope.pth: no such file"):
        preflight.check(build_config("pisa", {**kw, "lpips_weights": "/nope.pth"}))
    vgg = tmp_path / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), vgg)
    preflight.check(build_config("pisa", {**kw, "lpips_weights": str(vgg)}))  # found: no error
    # the discriminator backbone: not cached and downloads off → the flag to pass
    s3 = dict(kw, de_net=str(vgg), lpips_weights=str(vgg), disc_backbone="vit_tiny_patch16_224")
    s3.pop("pix_steps"), s3.pop("sem_steps")
    with pytest.raises(WeightsNotFoundError, match="disc_weights=FILE"):
        preflight.check(build_config("s3diff", s3))
    with pytest.raises(WeightsNotFoundError, match="disc_weights=/nope: no such file"):
        preflight.check(build_config("s3diff", {**s3, "disc_weights": "/nope"}))


def test_local_backbone_files_are_loaded(tmp_path):
    import timm
    import torchvision
    from safetensors.torch import save_file

    from diffsr.train.losses import LPIPSLoss, VisionAidedDiscriminator

    torch.manual_seed(3)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    d = VisionAidedDiscriminator(
        "vit_tiny_patch16_224", weights=str(tmp_path / "vit.safetensors"), head_channels=8
    )
    assert torch.equal(d.backbone.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    tv = torchvision.models.vgg16(weights=None)
    torch.save(tv.state_dict(), tmp_path / "vgg.pth")
    lp = LPIPSLoss("vgg", weights=str(tmp_path / "vgg.pth"))
    assert torch.equal(lp.net.net.slice4._modules["21"].weight, tv.features[21].weight)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsNotFoundError, match="not torchvision vgg weights"):
        LPIPSLoss("vgg", weights=str(tmp_path / "bad.pth"))
