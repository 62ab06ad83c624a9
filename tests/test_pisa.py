"""PiSA-SR against independent computations: hand-merged UNets, the authors' checkpoint layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from diffsr.errors import CheckpointError, WeightsNotFoundError, cli_messages
from diffsr.methods.pisa import PisaConfig, PiSASR, PisaWeights, RunOptions, preprocess
from diffsr.sd import encode_prompts
from diffsr.synthetic import random_sd_parts


def hand_merged_unet(sets: list[dict[str, torch.Tensor]], scale: float = 2.0):
    """The tiny UNet (seed 0) with W + scale·B@A added by hand for each LoRA set (no peft)."""
    unet = random_sd_parts("tiny", seed=0, text_encoder=False).unet
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for tensors in sets:
            for key, a in tensors.items():
                if ".lora_A." not in key:
                    continue
                module = key.split(".lora_A.")[0]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                w = params[module + ".weight"]
                if w.dim() == 2:
                    delta = b @ a
                else:  # conv: A keeps the kernel, B is 1x1
                    delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
                w += scale * delta
    return unet


def empty_prompt():
    parts = random_sd_parts("tiny", seed=0)
    return encode_prompts(parts.text_encoder, parts.tokenizer, [""])


def test_rank_and_scale_defaults(pisa_weights):
    cfg = pisa_weights.config
    assert (cfg.rank_pix, cfg.rank_sem, cfg.alpha_pix / cfg.rank_pix, cfg.timestep, cfg.prompt) == (
        4,
        4,
        2.0,
        1,
        "",
    )


@pytest.mark.parametrize("lp,ls", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.3), (1.2, 0.0), (0.0, 0.0)])
def test_eq8_against_two_hand_merged_unets(pisa, pisa_weights, lp, ls):
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(5))
    emb = empty_prompt().expand(2, -1, -1)
    u_pix = hand_merged_unet([pisa_weights.pix])
    u_both = hand_merged_unet([pisa_weights.pix, pisa_weights.sem])
    with torch.no_grad():
        e_pix = u_pix(z, 1, encoder_hidden_states=emb).sample
        e_both = u_both(z, 1, encoder_hidden_states=emb).sample
    expected = lp * e_pix + ls * (e_both - e_pix)
    pair = pisa.predict_pair(z)  # one batched UNet call
    got = lp * pair[:, :4] + ls * (pair[:, 4:] - pair[:, :4])
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(e_pix, e_both, atol=1e-3)  # the semantic set matters


def test_default_mode_is_one_merged_pass(pisa, pisa_weights):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    h = pisa.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    eps = pisa.predict_default(z)
    pisa.predict_pair(z)
    h.remove()
    assert calls == [1, 2]  # default: one pass of batch 1; adjustable: ONE pass of batch 2
    u_both = hand_merged_unet([pisa_weights.pix, pisa_weights.sem])
    with torch.no_grad():
        ref = u_both(z, 1, encoder_hidden_states=empty_prompt()).sample
    torch.testing.assert_close(eps, ref, atol=2e-5, rtol=1e-4)


def test_no_second_unet_copy(pisa):
    n_base = sum(p.numel() for n, p in pisa.unet.named_parameters() if "lora_" not in n)
    fresh = random_sd_parts("tiny", seed=0, text_encoder=False).unet
    assert n_base == sum(p.numel() for p in fresh.parameters())
    n_lora = sum(p.numel() for n, p in pisa.unet.named_parameters() if "lora_" in n)
    assert 0 < n_lora < 0.2 * n_base and not any(".pix." in n for n, _ in pisa.unet.named_parameters())


def test_lambda_one_equals_default_and_rerender_equals_fresh(pisa):
    lr = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    y_default, info = pisa.restore(lr)
    assert info["mode"] == "default"
    adj = pisa.adjustable(lr)
    torch.testing.assert_close(adj.render(1.0, 1.0), y_default, atol=1e-4, rtol=0)
    adj.render(1.4, 0.2)  # rendering must not change the stored state
    y_fresh, info = pisa.restore(lr, lambda_pix=0.5, lambda_sem=0.8)
    assert info == {"mode": "adjustable", "lambda_pix": 0.5, "lambda_sem": 0.8}
    torch.testing.assert_close(adj.render(0.5, 0.8), y_fresh, atol=1e-6, rtol=0)
    assert (adj.render(0.5, 0.8) - y_default).abs().max() > 1e-3


def test_rerender_runs_no_unet(pisa):
    lr = torch.rand(1, 3, 32, 32)
    adj = pisa.adjustable(lr)
    calls = []
    h = pisa.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    adj.render(0.3, 0.9)
    h.remove()
    assert calls == []


def test_encoding_deterministic_by_default_and_seedable(pisa):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    a = pisa.encode(x, RunOptions())
    torch.testing.assert_close(a, pisa.encode(x, RunOptions()), atol=0, rtol=0)
    s1 = pisa.encode(x, RunOptions(sample_posterior=True, seed=7))
    s2 = pisa.encode(x, RunOptions(sample_posterior=True, seed=7))
    s3 = pisa.encode(x, RunOptions(sample_posterior=True, seed=8))
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)
    assert not torch.equal(s1, s3) and not torch.equal(s1, a)


def _official_pkl(weights: PisaWeights) -> dict:
    """The authors' layout, written here without diffsr's exporter."""
    sd = {"lora_rank_unet_pix": 4, "lora_rank_unet_sem": 4, "state_dict_unet": {}}
    for s, tensors in (("pix", weights.pix), ("sem", weights.sem)):
        for loc in ("encoder", "decoder", "others"):
            sd[f"unet_lora_{loc}_modules_{s}"] = []
        for key, v in tensors.items():
            module = key.split(".lora_")[0]
            if "down_blocks" in module or "conv_in" in module:
                loc = "encoder"
            elif "up_blocks" in module or "conv_out" in module:
                loc = "decoder"
            else:
                loc = "others"
            if module not in sd[f"unet_lora_{loc}_modules_{s}"]:
                sd[f"unet_lora_{loc}_modules_{s}"].append(module)
            sd["state_dict_unet"][key.replace(f".{s}.", f".default_{loc}_{s}.")] = v
    return sd


def test_official_pkl_loads_and_matches_hand_merge(tmp_path, pisa_weights):
    path = tmp_path / "pisa_sr.pkl"
    torch.save(_official_pkl(pisa_weights), path)
    w = PisaWeights.load(path)
    assert set(w.config.targets_pix) == set(pisa_weights.config.targets_pix)
    assert len(w.pix) + len(w.sem) == len(_official_pkl(pisa_weights)["state_dict_unet"])
    model = PiSASR.from_parts(random_sd_parts("tiny", seed=0), w)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref_unet = hand_merged_unet([pisa_weights.pix, pisa_weights.sem])
    with torch.no_grad():
        ref = ref_unet(z, 1, encoder_hidden_states=empty_prompt()).sample
    torch.testing.assert_close(model.predict_default(z), ref, atol=2e-5, rtol=1e-4)


def test_export_official_round_trip(tmp_path, pisa_weights):
    p = pisa_weights.to_official(tmp_path / "x.pkl")
    sd = torch.load(p, weights_only=True)
    assert len(sd["unet_lora_encoder_modules_pix"]) + len(sd["unet_lora_decoder_modules_pix"]) + len(
        sd["unet_lora_others_modules_pix"]
    ) == len(pisa_weights.config.targets_pix)
    assert all(".default_" in k for k in sd["state_dict_unet"])
    back = PisaWeights.load(p)
    for k, v in {**pisa_weights.pix, **pisa_weights.sem}.items():
        assert torch.equal(v, {**back.pix, **back.sem}[k])


def test_diffsr_format_round_trip(tmp_path, pisa_weights):
    folder = pisa_weights.save(tmp_path / "w")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = PisaWeights.load(folder)
    assert back.config == pisa_weights.config
    assert back.pix.keys() == pisa_weights.pix.keys() and back.sem.keys() == pisa_weights.sem.keys()
    assert all(torch.equal(back.pix[k], v) for k, v in pisa_weights.pix.items())
    assert all(torch.equal(back.sem[k], v) for k, v in pisa_weights.sem.items())
    assert PisaConfig.from_dict(pisa_weights.config.to_dict()) == pisa_weights.config


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"state_dict_unet": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match="evil.pkl: refused"):
        PisaWeights.load(path)
    assert not marker.exists()
    torch.save({"state_dict_unet": {}, "x": _Evil(str(marker))}, tmp_path / "evil2.pkl")
    with pytest.raises(CheckpointError, match="refused"):
        PisaWeights.load(tmp_path / "evil2.pkl")
    assert not marker.exists()


def test_bad_checkpoints(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such"):
        PisaWeights.load(tmp_path / "missing.pkl")
    torch.save({"foo": 1}, tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="not a PiSA-SR checkpoint"):
        PisaWeights.load(tmp_path / "other.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="junk.pkl"):
        PisaWeights.load(tmp_path / "junk.pkl")


def test_weights_missing_message(monkeypatch):
    monkeypatch.delenv("DIFFSR_PISA_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError, match="pass weights=PATH or set DIFFSR_PISA_WEIGHTS"):
        PiSASR.from_pretrained(None, device="cpu")
    with (
        cli_messages(),
        pytest.raises(WeightsNotFoundError, match="pass --weights PATH or set DIFFSR_PISA_WEIGHTS"),
    ):
        PiSASR.from_pretrained(None, device="cpu")


@pytest.mark.parametrize(
    "h,w,up",
    [(32, 40, (128 * 4, 160 * 4)), (130, 129, (520, 512)), (128, 200, (512, 800)), (20, 300, (512, 7680))],
)
def test_preprocess_sizes(h, w, up):
    x, size = preprocess(torch.rand(1, 3, h, w))
    assert tuple(x.shape[-2:]) == up
    assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0
    assert size == (4 * h, 4 * w)


def _authors_preprocess(a):
    """The authors' PIL steps on an 8-bit RGB array, restated (test_pisasr.py)."""
    from PIL import Image

    im = Image.fromarray(a)
    w, h = im.size
    if w < 128 or h < 128:
        s = 128 / min(w, h)
        im = im.resize((int(s * w), int(s * h)))  # Pillow's default filter: bicubic
    im = im.resize((im.size[0] * 4, im.size[1] * 4))
    im = im.resize((im.width - im.width % 8, im.height - im.height % 8), Image.LANCZOS)
    return np.asarray(im)


@pytest.mark.parametrize("shape", [(140, 136), (37, 53), (130, 97)])
def test_preprocess_equals_the_authors_8bit_path_exactly(shape, tmp_path):
    from PIL import Image

    from diffsr.api import _rgb_tensor
    from diffsr.io import read_image

    g = np.random.default_rng(0)
    a = (g.random((*shape, 3)) * 255).astype(np.uint8)
    a[:, : shape[1] // 2] = 255 - a[:, : shape[1] // 2] // 8  # sharp edges, where the float path differs
    Image.fromarray(a).save(tmp_path / "in.png")
    x, _ = preprocess(_rgb_tensor(read_image(tmp_path / "in.png")))  # through diffsr's own I/O
    got = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(got, _authors_preprocess(a))
    assert torch.equal(x, torch.from_numpy(got).permute(2, 0, 1)[None].float() / 255)


def test_preprocess_float_path_for_16_bit_data():
    a = np.random.default_rng(1).integers(0, 65536, (40, 44, 3)).astype(np.float32) / 65535
    x, _ = preprocess(torch.from_numpy(a).permute(2, 0, 1)[None])
    ref = _authors_preprocess((a * 255).round().astype(np.uint8)).astype(np.float32) / 255
    got = x[0].permute(1, 2, 0).numpy()
    assert x.shape[-2:] == (512, 560)
    assert np.abs(got - ref).mean() < 2 / 255  # the same kernels, without 8-bit rounding
    assert not np.all((got * 255 - (got * 255).round()) == 0)  # not quantised to 8 bits


@pytest.mark.parametrize("h,w", [(300, 1), (1, 300), (3, 2000)])
def test_long_thin_inputs_stay_bounded(h, w):
    from diffsr.methods.pisa import MAX_ENLARGED_AREA, enlarge_factor

    s = enlarge_factor(h, w)
    assert int(s * h) * int(s * w) <= MAX_ENLARGED_AREA and min(int(s * h), int(s * w)) >= 2
    x, size = preprocess(torch.rand(1, 3, h, w))
    assert size == (4 * h, 4 * w) and x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0 and min(x.shape[-2:]) >= 8
    assert x.shape[-2] * x.shape[-1] <= 16 * MAX_ENLARGED_AREA


@pytest.mark.slow
def test_long_thin_image_upscales_in_bounded_time(pisa):
    """300×1: the authors' rule would run the model on 153600×512 pixels; ours on ≤ 2048²."""
    import time

    t = time.perf_counter()
    y, _ = pisa.restore(torch.rand(1, 3, 300, 1), lambda_pix=0.5, lambda_sem=0.5)
    assert tuple(y.shape) == (1, 3, 1200, 4) and torch.isfinite(y).all()
    assert time.perf_counter() - t < 180


@pytest.mark.parametrize("size", [(24, 28), (140, 136)])
def test_restore_output_is_exactly_4x(pisa, size):
    y, _ = pisa.restore(torch.rand(1, 3, *size), lambda_pix=0.7, lambda_sem=0.4)
    assert tuple(y.shape) == (1, 3, 4 * size[0], 4 * size[1])
    assert y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()
