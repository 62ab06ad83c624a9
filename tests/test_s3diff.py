"""S3Diff against independent computations: modulated LoRA, block IDs, CFG, the authors' checkpoint."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F

from diffsr import lora
from diffsr.errors import CheckpointError, ConfigError, WeightsNotFoundError
from diffsr.methods.base import RunOptions
from diffsr.methods.s3diff import (
    DegradationEstimator,
    S3Diff,
    S3DiffConfig,
    S3DiffWeights,
    unet_block_id,
    vae_block_id,
)
from diffsr.sd import encode_prompts
from diffsr.synthetic import meta_unet, meta_vae, random_sd_parts

LIN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def test_block_id_counts_on_sd21():
    cfg = S3DiffConfig()
    unet_mods = lora.matching_modules(meta_unet("sd21"), list(cfg.unet_targets))
    vae_mods = lora.matching_modules(meta_vae("sd21"), cfg.vae_targets)
    assert len(unet_mods) == 257 and "conv_in" not in unet_mods
    assert len(vae_mods) == 31
    assert collections.Counter(map(unet_block_id, unet_mods)) == {
        0: 29, 1: 30, 2: 30, 3: 4, 4: 16, 5: 10, 6: 46, 7: 46, 8: 45, 9: 1
    }  # fmt: skip
    assert collections.Counter(map(vae_block_id, vae_mods)) == {0: 5, 1: 6, 2: 6, 3: 4, 4: 8, 5: 2}


def _lora_parts(layer, adapter="default"):
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    return a, b, layer.scaling[adapter], layer.get_base_layer()


@pytest.mark.parametrize("name", [LIN, CONV])
def test_modulated_lora_matches_einsum_per_sample(s3diff, name):
    layer = s3diff.unet.get_submodule(name)
    a, b, s, base = _lora_parts(layer)
    assert s == pytest.approx(8 / 32)
    g = torch.Generator().manual_seed(0)
    if name == LIN:
        x = torch.randn(2, 7, base.in_features, generator=g)
    else:
        x = torch.randn(2, base.in_channels, 9, 11, generator=g)
    scores = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
    with s3diff.modulated(scores) as (m_unet, _):
        got = layer(x)
        singles = []
        for i in range(2):
            with s3diff.modulated(scores[i : i + 1]):
                singles.append(layer(x[i : i + 1]))
    m = m_unet[:, unet_block_id(name)]  # (2, r, r)
    if name == LIN:
        h = torch.einsum("nlk,rk->nlr", x, a)  # A x
        h = torch.einsum("nlk,nkr->nlr", h, m)  # Mᵀ (A x)
        expect = F.linear(x, base.weight, base.bias) + s * torch.einsum("nlr,or->nlo", h, b)
    else:
        h = F.conv2d(x, a, stride=base.stride, padding=base.padding)
        h = torch.einsum("nkhw,nkr->nrhw", h, m)
        expect = base(x) + s * F.conv2d(h, b)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(singles), got, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got[0], got[0] * 0 + base(x)[0], atol=1e-4)  # the LoRA contributes


def test_lora_refuses_to_run_unmodulated(s3diff):
    with pytest.raises(RuntimeError, match="without degradation modulation"):
        s3diff.unet.get_submodule(LIN)(torch.randn(1, 3, s3diff.unet.get_submodule(LIN).in_features))


def test_batched_cfg_equals_two_passes_in_one_call(s3diff):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    h = s3diff.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with s3diff.modulated(torch.tensor([[0.3, 0.4]])):
        batched = s3diff.predict_eps(z, 1.07, batched=True)
        separate = s3diff.predict_eps(z, 1.07, batched=False)
    h.remove()
    assert calls == [6, 3, 3]
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)


def test_prompt_embeddings_computed_once(s3diff, monkeypatch):
    import diffsr.methods.s3diff as mod

    assert s3diff.pos_embeds.shape[:2] == (1, 77) and s3diff.neg_embeds.shape[:2] == (1, 77)
    assert not torch.equal(s3diff.pos_embeds, s3diff.neg_embeds)
    monkeypatch.setattr(mod, "encode_prompts", lambda *a, **k: pytest.fail("prompts re-encoded"))
    s3diff.restore(torch.rand(1, 3, 16, 16), tile_size=4, tile_overlap=1)  # many tiles, no re-encoding


def test_score_override_equals_api_scores(s3diff, monkeypatch):
    lr = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    y_est, info = s3diff.restore(lr)
    y_over, info_o = s3diff.restore(lr, blur=0.8, noise=0.05)
    assert info_o["used"] == {"blur": 0.8, "noise": 0.05} and info_o["estimated"] == info["estimated"]
    assert (y_over - y_est).abs().max() > 1e-3
    monkeypatch.setattr(s3diff, "estimate", lambda x: torch.tensor([[0.8, 0.05]]))
    y_api, info_a = s3diff.restore(lr)
    assert info_a["estimated"] == pytest.approx({"blur": 0.8, "noise": 0.05})
    torch.testing.assert_close(y_api, y_over, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="blur"):
        s3diff.restore(lr, blur=1.5)


def test_x0_formula(s3diff):
    assert s3diff.alpha_bar == pytest.approx(0.004660, abs=5e-7)
    z, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    expect = (z - math.sqrt(1 - 0.0046600) * eps) / math.sqrt(0.0046600)
    torch.testing.assert_close(s3diff.x0(z, eps), expect, atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- the authors' checkpoint, by hand
def _official_pkl(w: S3DiffWeights) -> dict:
    """The authors' s3diff.pkl layout, written here without diffsr's exporter."""
    mods = ("vae_de_mlp", "unet_de_mlp", "vae_block_mlp", "unet_block_mlp", "vae_fuse_mlp", "unet_fuse_mlp")
    sd = {
        "unet_lora_target_modules": list(w.config.unet_targets),
        "vae_lora_target_modules": w.config.vae_targets,
        "rank_unet": 32,
        "rank_vae": 16,
        "state_dict_unet": dict(w.unet),
        "state_dict_vae": dict(w.vae),
        "w": w.modulation["W"],
        "state_embeddings": {
            "state_dict_vae_block": {"weight": w.modulation["vae_block_embeddings.weight"]},
            "state_dict_unet_block": {"weight": w.modulation["unet_block_embeddings.weight"]},
        },
    }
    for m in mods:
        sd[f"state_dict_{m}"] = {
            k.split(".", 1)[1]: v for k, v in w.modulation.items() if k.startswith(m + ".")
        }
    return sd


def _hand_matrices(sd: dict, scores: torch.Tensor, net: str, rank: int) -> torch.Tensor:
    """M (B, blocks, r, r) from the pkl tensors with plain ops (Fourier embedding, MLPs)."""
    proj = scores[..., None] * sd["w"] * 2 * math.pi  # (B, 2, 64)
    emb = torch.cat([proj.sin(), proj.cos()], -1)
    emb = torch.cat([emb[:, 0], emb[:, 1]], -1)  # (B, 256)
    de_sd, blk_sd, fuse_sd = (sd[f"state_dict_{net}_{m}"] for m in ("de_mlp", "block_mlp", "fuse_mlp"))
    de = F.relu(emb @ de_sd["0.weight"].T + de_sd["0.bias"])
    table = sd["state_embeddings"][f"state_dict_{net}_block"]["weight"]
    blocks = F.relu(table @ blk_sd["0.weight"].T + blk_sd["0.bias"])
    out = []
    for b in range(scores.shape[0]):
        cat = torch.cat([de[b].expand(blocks.shape[0], -1), blocks], -1)
        out.append((cat @ fuse_sd["weight"].T + fuse_sd["bias"]).view(-1, rank, rank))
    return torch.stack(out)


def _merge_by_hand(model, lora_sd: dict, adapter: str, m: torch.Tensor, block_id, scale: float):
    """W += scale · B Mᵀ A for every LoRA module (valid for one sample's M)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in lora_sd.items():
            if f".lora_A.{adapter}." not in key:
                continue
            module = key.split(".lora_A.")[0]
            b = lora_sd[key.replace(".lora_A.", ".lora_B.")]
            mt = m[block_id(module)].T
            if a.dim() == 2:
                delta = b @ mt @ a
            else:
                delta = torch.einsum("oj,jk,kihw->oihw", b[:, :, 0, 0], mt, a)
            params[module + ".weight"] += scale * delta


def test_official_pkl_loads_and_matches_hand_computation(tmp_path, s3diff_weights):
    sd = _official_pkl(s3diff_weights)
    torch.save(sd, tmp_path / "s3diff.pkl")
    w = S3DiffWeights.load(tmp_path / "s3diff.pkl")
    assert w.de_net is None
    model = S3Diff.from_parts(random_sd_parts("tiny", seed=0), w, de_net=DegradationEstimator())
    scores = torch.tensor([[0.35, 0.6]])
    m_unet = _hand_matrices(sd, scores, "unet", 32)[0]
    m_vae = _hand_matrices(sd, scores, "vae", 16)[0]

    ref = random_sd_parts("tiny", seed=0)
    emb = encode_prompts(
        ref.text_encoder, ref.tokenizer, [S3DiffConfig().pos_prompt, S3DiffConfig().neg_prompt]
    )
    _merge_by_hand(ref.unet, sd["state_dict_unet"], "default", m_unet, unet_block_id, 8 / 32)
    _merge_by_hand(ref.vae, sd["state_dict_vae"], "vae_skip", m_vae, vae_block_id, 8 / 16)
    with torch.no_grad():
        ref.unet.conv_in.weight.copy_(sd["state_dict_unet"]["conv_in.weight"])
        ref.unet.conv_in.bias.copy_(sd["state_dict_unet"]["conv_in.bias"])
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
        z_ref = ref.vae.encode(x).latent_dist.mode() * 0.18215
        eps = ref.unet(torch.cat([z_ref, z_ref]), 999, encoder_hidden_states=emb).sample
        eps_ref = eps[1:] + 1.07 * (eps[:1] - eps[1:])

    with model.modulated(scores):
        z = model.encode(x, RunOptions())
        got = model.predict_eps(z, 1.07)
    torch.testing.assert_close(z, z_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, eps_ref, atol=5e-5, rtol=1e-4)


def test_formats_round_trip(tmp_path, s3diff_weights):
    folder = s3diff_weights.save(tmp_path / "w")
    back = S3DiffWeights.load(folder)
    assert back.config == s3diff_weights.config
    for group in ("unet", "vae", "modulation", "de_net"):
        a, b = getattr(s3diff_weights, group), getattr(back, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pkl = S3DiffWeights.load(s3diff_weights.to_official(tmp_path / "x.pkl"))
    for group in ("unet", "vae", "modulation"):
        a, b = getattr(s3diff_weights, group), getattr(pkl, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert S3DiffConfig.from_dict(s3diff_weights.config.to_dict()) == s3diff_weights.config


def test_degradation_estimator_layout_and_range(tmp_path):
    net = DegradationEstimator()
    sd = net.state_dict()
    assert sd["conv_first.0.weight"].shape == (64, 3, 3, 3)
    assert sd["body.0.6.weight"].shape == (128, 64, 3, 3)  # the stride-2 conv after the third stage
    assert sd["body.1.8.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["fc_degree.1.0.weight"].shape == (512, 128) and sd["fc_degree.1.2.weight"].shape == (1, 512)
    assert len([k for k in sd if k.startswith("body.0.")]) == 2 * (8 * 2) + 2
    torch.save(sd, tmp_path / "de_net.pth")
    loaded = DegradationEstimator.load(tmp_path / "de_net.pth")
    x = torch.rand(2, 3, 37, 23)
    out = loaded(x)
    assert out.shape == (2, 2) and ((out > 0) & (out < 1)).all()
    torch.testing.assert_close(out, net(x))
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth"):
        DegradationEstimator.load(tmp_path / "bad.pth")


@pytest.mark.parametrize("size", [(13, 17), (40, 24)])
def test_restore_sizes_and_tiling(s3diff, size):
    lr = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(4))
    y, _ = s3diff.restore(lr)
    assert y.shape == (1, 3, 4 * size[0], 4 * size[1]) and 0 <= y.min() and y.max() <= 1
    events = []
    y_tiled, _ = s3diff.restore(lr, tile_size=6, tile_overlap=2, tile_batch=3, progress=events.append)
    assert y_tiled.shape == y.shape and torch.isfinite(y_tiled).all()
    assert events[-1]["total"] > 1 and events[-1]["done"] == events[-1]["total"]
    y_one, _ = s3diff.restore(lr, tile_size=64)  # one tile covers the latent: the untiled result
    torch.testing.assert_close(y_one, y, atol=0, rtol=0)


def test_missing_estimator_and_offline_hub(monkeypatch, tmp_path, s3diff_weights, tiny_sd_dir):
    from diffsr.api import load

    no_de = S3DiffWeights(
        s3diff_weights.config, s3diff_weights.unet, s3diff_weights.vae, s3diff_weights.modulation
    )
    folder = no_de.save(tmp_path / "no_de")
    monkeypatch.delenv("DIFFSR_DE_NET", raising=False)
    with pytest.raises(WeightsNotFoundError, match="DIFFSR_DE_NET") as e:
        load("s3diff", weights=folder, base=tiny_sd_dir)
    assert "assets/mm-realsr/de_net.pth" in str(e.value)
    de_path = tmp_path / "de_net.pth"
    torch.save(DegradationEstimator().state_dict(), de_path)
    monkeypatch.setenv("DIFFSR_DE_NET", str(de_path))
    assert load("s3diff", weights=folder, base=tiny_sd_dir).method == "s3diff"
    monkeypatch.delenv("DIFFSR_S3DIFF_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError, match="zhangap/S3Diff/s3diff.pkl") as e:
        load("s3diff", base=tiny_sd_dir)
    assert "pass weights=PATH or set DIFFSR_S3DIFF_WEIGHTS" in str(e.value) and "--" not in str(e.value)
