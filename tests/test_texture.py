"""PatchScaler texture prompt: FPS, RTM build/retrieval/storage, texture classifier, texture encoder,
procedural textures. Offline; no VAE weights exist, so a fixed random linear "encoder" (8× average
pool + a 3→4 channel mix) stands in for the SD VAE on 128×128 crops."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsr.errors import CheckpointError, ConfigError
from diffsr.methods.patchscaler.procedural import TEXTURE_KINDS, procedural_dataset, procedural_textures
from diffsr.methods.patchscaler.texture import (
    ReferenceTextureMemory,
    TextureClassifier,
    TextureEncoder,
    build_rtm,
    farthest_point_sampling,
    select_texture_crops,
    train_classifier,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Farthest point sampling
def _fps_reference(points: np.ndarray, k: int, start: int) -> list[int]:
    """Greedy FPS written out: explicit min-distance to the chosen set, max over unchosen points,
    ties to the lowest index."""
    n = len(points)
    chosen = [start]
    while len(chosen) < k:
        best, best_d = None, -1.0
        for i in range(n):
            if i in chosen:
                continue
            d = min(float(np.sum((points[i] - points[j]) ** 2)) for j in chosen)
            if d > best_d:  # strict: an equal distance later keeps the lower index
                best, best_d = i, d
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fps_matches_bruteforce(dtype):
    pts = torch.randn(60, 5, generator=_gen(0), dtype=torch.float64).to(dtype)
    got = farthest_point_sampling(pts, 20, start=7)
    assert got.dtype == torch.long and got.shape == (20,)
    assert got.tolist() == _fps_reference(pts.double().numpy(), 20, 7)


def test_fps_ties_go_to_lowest_index():
    # Integer coordinates: all distances are exact, so every tie is a true tie.
    pts = torch.tensor([[0, 0], [2, 0], [0, 2], [-2, 0], [0, -2], [2, 0], [0, 0]], dtype=torch.float32)
    for start in range(len(pts)):
        got = farthest_point_sampling(pts, len(pts), start=start).tolist()
        assert got == _fps_reference(pts.numpy(), len(pts), start)
    assert farthest_point_sampling(pts, 5).tolist() == [0, 1, 2, 3, 4]


def test_fps_deterministic_start_and_permutation():
    pts = torch.rand(40, 3, generator=_gen(1))
    a = farthest_point_sampling(pts, 10)
    assert torch.equal(a, farthest_point_sampling(pts, 10))
    assert a[0] == 0  # default start
    b = farthest_point_sampling(pts, 10, start=13)
    assert b[0] == 13 and not torch.equal(a, b)
    assert len(set(b.tolist())) == 10
    full = farthest_point_sampling(pts, 40, start=5)
    assert sorted(full.tolist()) == list(range(40))
    # duplicates: k = N still a permutation
    dup = torch.cat([pts[:5], pts[:5], pts[:5]])
    assert sorted(farthest_point_sampling(dup, 15).tolist()) == list(range(15))
    assert farthest_point_sampling(pts, 0).shape == (0,)


def test_fps_errors():
    pts = torch.rand(5, 2)
    with pytest.raises(ConfigError, match="larger than"):
        farthest_point_sampling(pts, 6)
    with pytest.raises(ConfigError, match="start"):
        farthest_point_sampling(pts, 2, start=5)
    with pytest.raises(ConfigError, match="start"):
        farthest_point_sampling(pts, 2, start=-1)
    with pytest.raises(ConfigError):
        farthest_point_sampling(pts, -1)
    with pytest.raises(ConfigError):
        farthest_point_sampling(pts, True)
    with pytest.raises(ConfigError, match="2-D"):
        farthest_point_sampling(torch.rand(5), 2)
    with pytest.raises(ConfigError, match="NaN"):
        farthest_point_sampling(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 2)


# ------------------------------------------------------------------------------------------------
# Retrieval
def _random_rtm(n=50, d=16, seed=0) -> ReferenceTextureMemory:
    g = _gen(seed)
    keys = F.normalize(torch.randn(n, d, generator=g), dim=1)
    values = torch.randn(n, 4, 16, 16, generator=g)
    return ReferenceTextureMemory(keys, values)


def test_retrieve_matches_bruteforce_cosine():
    rtm = _random_rtm()
    q = torch.randn(7, 16, generator=_gen(3)) * 4.0
    values, sims, idx = rtm.retrieve(q, k=5)
    assert values.shape == (7, 5, 4, 16, 16) and sims.shape == (7, 5) and idx.shape == (7, 5)
    keys, qn = rtm.keys.double().numpy(), q.double().numpy()
    cos = (qn / np.linalg.norm(qn, axis=1, keepdims=True)) @ keys.T
    order = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    assert np.array_equal(idx.numpy(), order)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(cos, order, axis=1), atol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    assert torch.equal(values, rtm.values[idx])
    assert torch.equal(values[2, 1], rtm.values[idx[2, 1]])


def test_retrieve_normalises_query_and_defaults():
    rtm = _random_rtm()
    q = torch.randn(4, 16, generator=_gen(4))
    v1, s1, i1 = rtm.retrieve(q)
    v2, s2, i2 = rtm.retrieve(q * 123.0)
    assert i1.shape == (4, 3)  # default k = 3 (D11)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-6) and torch.equal(v1, v2)
    assert (s1.abs() <= 1 + 1e-5).all()
    # a query equal to a key finds it first, with similarity 1
    _, s, i = rtm.retrieve(rtm.keys[[11, 29]] * 2.0, k=1)
    assert i[:, 0].tolist() == [11, 29] and torch.allclose(s[:, 0], torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match="larger than"):
        rtm.retrieve(q, k=51)
    with pytest.raises(ConfigError, match="query_keys"):
        rtm.retrieve(torch.randn(4, 15))


def test_rtm_normalises_keys_and_checks_shapes():
    keys = torch.randn(6, 8) * 3
    rtm = ReferenceTextureMemory(keys, torch.randn(6, 4, 16, 16))
    assert torch.allclose(rtm.keys.norm(dim=1), torch.ones(6), atol=1e-6)
    assert len(rtm) == 6 and rtm.key_dim == 8 and rtm.value_shape == (4, 16, 16)
    with pytest.raises(ConfigError):
        ReferenceTextureMemory(torch.randn(6, 8), torch.randn(5, 4, 16, 16))
    with pytest.raises(ConfigError):
        ReferenceTextureMemory(torch.randn(6, 8), torch.randn(6, 4, 16))


# ------------------------------------------------------------------------------------------------
# RTM build and storage
@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return TextureClassifier(4, 5, (8, 8, 8, 8), 16, blocks_per_stage=1).eval()


@pytest.mark.parametrize("fps_on", ["key", "key+value"])
def test_build_rtm_selects_pairs(tiny_classifier, fps_on):
    values = torch.randn(50, 4, 16, 16, generator=_gen(5))
    rtm = build_rtm(values, tiny_classifier, 20, batch_size=7, fps_on=fps_on, start=3)
    assert len(rtm) == 20 and rtm.keys.shape == (20, 16) and rtm.values.shape == (20, 4, 16, 16)
    assert torch.allclose(rtm.keys.norm(dim=1), torch.ones(20), atol=1e-5)
    with torch.no_grad():
        all_keys = tiny_classifier.key(values)
    points = all_keys if fps_on == "key" else torch.cat([all_keys, F.normalize(values.flatten(1), dim=1)], 1)
    idx = farthest_point_sampling(points, 20, start=3)
    assert idx[0] == 3
    assert torch.equal(rtm.values, values[idx])  # same indices for values …
    assert torch.allclose(rtm.keys, all_keys[idx], atol=1e-5)  # … and keys
    with torch.no_grad():
        assert torch.allclose(rtm.keys, tiny_classifier.key(rtm.values), atol=1e-5)
    again = build_rtm(values, tiny_classifier, 20, fps_on=fps_on, start=3)
    assert torch.equal(again.values, rtm.values) and torch.allclose(again.keys, rtm.keys, atol=1e-6)
    assert rtm.info["fps_on"] == fps_on and rtm.info["candidates"] == 50


def test_build_rtm_errors_and_mode(tiny_classifier):
    values = torch.randn(10, 4, 16, 16)
    with pytest.raises(ConfigError, match="exceeds"):
        build_rtm(values, tiny_classifier, 11)
    with pytest.raises(ConfigError, match="fps_on"):
        build_rtm(values, tiny_classifier, 5, fps_on="value")
    tiny_classifier.train()
    build_rtm(values, tiny_classifier, 5)
    assert tiny_classifier.training  # mode restored
    tiny_classifier.eval()


def test_rtm_save_load_roundtrip(tmp_path, tiny_classifier):
    values = torch.randn(40, 4, 16, 16, generator=_gen(6)) * 3
    rtm = build_rtm(values, tiny_classifier, 12, k=4)
    rtm.save(tmp_path / "rtm")
    cfg = json.loads((tmp_path / "rtm" / "config.json").read_text())
    assert (
        cfg["method"] == "rtm" and cfg["size"] == 12 and cfg["k"] == 4 and cfg["value_shape"] == [4, 16, 16]
    )
    back = ReferenceTextureMemory.load(tmp_path / "rtm")
    assert torch.equal(back.keys, rtm.keys)
    assert back.values.dtype == torch.float32
    assert torch.equal(back.values, rtm.values.half().float())  # exactly the fp16 rounding
    assert torch.allclose(back.values, rtm.values, rtol=1e-3, atol=1e-4)
    assert back.k == 4 and back.info == rtm.info and len(back) == 12
    q = torch.randn(3, 16, generator=_gen(7))
    assert torch.equal(back.retrieve(q)[2], rtm.retrieve(q)[2])
    tiny_classifier.save(tmp_path / "clf")
    with pytest.raises(CheckpointError, match="texture-classifier"):
        ReferenceTextureMemory.load(tmp_path / "clf")


# ------------------------------------------------------------------------------------------------
# Texture classifier
def test_classifier_shapes_and_errors():
    torch.manual_seed(0)
    m = TextureClassifier(widths=(8, 16, 16, 16), feature_dim=32, num_classes=7)
    for v in (8, 16, 24):
        x = torch.randn(3, 4, v, v)
        assert m.features(x).shape == (3, 32)
        assert m(x).shape == (3, 7)
        assert torch.allclose(m.key(x).norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ConfigError, match="expects"):
        m(torch.randn(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="4 entries"):
        TextureClassifier(widths=(8, 8, 8))
    with pytest.raises(ConfigError, match="norm"):
        TextureClassifier(norm="layer")
    # a patch's key does not depend on the rest of the batch: BatchNorm in eval mode, GroupNorm always
    x = torch.randn(5, 4, 16, 16)
    m.eval()
    assert torch.allclose(m.key(x)[:2], m.key(x[:2]), atol=1e-5)
    g = TextureClassifier(widths=(8, 16, 16, 16), feature_dim=32, norm="group").train()
    assert torch.allclose(g.key(x)[:2], g.key(x[:2]), atol=1e-5)


def test_classifier_save_load(tmp_path):
    torch.manual_seed(0)
    m = TextureClassifier(widths=(8, 16, 16, 16), feature_dim=32, num_classes=5).eval()
    m.save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["method"] == "texture-classifier" and cfg["widths"] == [8, 16, 16, 16]
    back = TextureClassifier.load(tmp_path / "c")
    assert back.config == m.config and not back.training and back.frozen
    assert not any(p.requires_grad for p in back.parameters())
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(back(x), m(x))
    back.train()  # e.g. a parent module switching to training: a frozen 𝒯 stays in eval mode
    assert not back.training
    with pytest.raises(ConfigError, match="frozen"):
        train_classifier(back, torch.randn(4, 4, 16, 16), torch.zeros(4, dtype=torch.long))
    assert back.unfreeze().train().training and all(p.requires_grad for p in back.parameters())
    # the architecture alone (as a PatchScaler checkpoint stores it), then the weights
    rebuilt = TextureClassifier.from_config_dict(m.config_dict())
    assert rebuilt.frozen and rebuilt.config == m.config
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt(x), m(x))
    with pytest.raises(CheckpointError, match="bad texture-classifier config"):
        TextureClassifier.from_config_dict({**m.config_dict(), "depth": 3})
    cfg["feature_dim"] = 16
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        TextureClassifier.load(tmp_path / "c")


# Stand-in for the SD-VAE encoder of a 128×128 crop: avg-pool by 8 → 16×16, fixed random 3→4 mix.
_MIX = torch.randn(4, 3, generator=_gen(1234))
_BIAS = 0.1 * torch.randn(4, generator=_gen(4321))


def _encode(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nchw->nohw", _MIX, F.avg_pool2d(images, 8)) + _BIAS.view(1, 4, 1, 1)


def _latent_set(n_per_kind: int, seed: int, kinds=TEXTURE_KINDS[:5]):
    g = _gen(seed)
    xs = [_encode(procedural_textures(kind, n_per_kind, generator=g)) for kind in kinds]
    return torch.cat(xs), torch.arange(len(kinds)).repeat_interleave(n_per_kind)


@pytest.fixture(scope="module")
def trained():
    """A tiny classifier trained on procedural 'latents' of 5 kinds, and held-out data."""
    x_train, y_train = _latent_set(300, seed=10)
    x_test, y_test = _latent_set(40, seed=11)
    torch.manual_seed(0)
    clf = TextureClassifier(4, 5, (16, 32, 32, 32), 64)
    losses = train_classifier(clf, x_train, y_train, steps=250, batch_size=32, generator=_gen(12))
    assert sum(losses[-20:]) < sum(losses[:20])
    return clf.freeze(), x_test, y_test


def test_trained_classifier_accuracy_and_keys(trained):
    clf, x, y = trained
    acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8, acc  # chance is 0.2
    k = clf.key(x)
    sim = k @ k.T
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(len(y), dtype=torch.bool)
    intra, inter = sim[same & off_diag].mean().item(), sim[~same].mean().item()
    assert intra > inter + 0.3, (intra, inter)


def test_retrieval_with_trained_classifier(trained):
    clf, x_query, y_query = trained
    x_ref, y_ref = _latent_set(40, seed=13)
    rtm = build_rtm(x_ref, clf, 80)
    # labels of the kept pairs: build_rtm's values are exact rows of x_ref
    ref_label = y_ref[torch.cdist(rtm.values.flatten(1), x_ref.flatten(1)).argmin(1)]
    assert len(ref_label.unique()) == 5  # FPS keeps every kind
    _, sims, idx = rtm.retrieve(clf.key(x_query))
    top1 = (ref_label[idx[:, 0]] == y_query).float().mean().item()
    topk = (ref_label[idx] == y_query[:, None]).float().mean().item()
    assert top1 > 0.8 and topk > 0.75, (top1, topk)


# ------------------------------------------------------------------------------------------------
# Similarity-aware texture encoder
def _tiny_encoder(**kw) -> TextureEncoder:
    torch.manual_seed(0)
    return TextureEncoder(dim=64, heads=4, depth=2, **kw)


def test_encoder_shape_and_no_timestep():
    enc = _tiny_encoder()
    refs, sims = torch.randn(2, 3, 4, 16, 16), torch.rand(2, 3)
    out = enc(refs, sims)
    assert out.shape == (2, 3 * 64, 64) == (2, enc.num_tokens, 64)
    assert list(inspect.signature(enc.forward).parameters) == ["refs", "sims"]
    with pytest.raises(TypeError):
        enc(refs, sims, torch.tensor([10]))
    assert enc(torch.randn(1, 5, 4, 16, 16), torch.rand(1, 5)).shape == (1, 5 * 64, 64)  # any K
    full = TextureEncoder()  # paper-size defaults: dim 768, 12 heads, p = 2, K = 3
    assert full(torch.randn(1, 3, 4, 16, 16), torch.rand(1, 3)).shape == (1, 192, 768)


@pytest.mark.parametrize("sim_weighting", [True, False])
def test_encoder_uses_similarities(sim_weighting):
    enc = _tiny_encoder(sim_weighting=sim_weighting).eval()
    refs = torch.randn(2, 3, 4, 16, 16, generator=_gen(0))
    sims = torch.tensor([[0.9, 0.7, 0.5], [0.8, 0.8, 0.1]])
    with torch.no_grad():
        a = enc(refs, sims)
        b = enc(refs, sims + torch.tensor([0.0, 0.05, -0.1]))
    assert (a - b).abs().max() > 1e-3


def test_encoder_permutation_reorders_tokens_only():
    enc = _tiny_encoder().eval()
    refs = torch.randn(2, 3, 4, 16, 16, generator=_gen(1))
    sims = torch.rand(2, 3, generator=_gen(2))
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = enc(refs, sims).view(2, 3, 64, 64)
        out_p = enc(refs[:, perm], sims[:, perm]).view(2, 3, 64, 64)
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)  # block k of the output follows reference k
    assert not torch.allclose(out_p, out, atol=1e-3)


def test_encoder_gradients_flow():
    enc = _tiny_encoder()
    refs = torch.randn(2, 3, 4, 16, 16, requires_grad=True)
    sims = torch.rand(2, 3, requires_grad=True)
    enc(refs, sims).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert refs.grad.abs().sum() > 0 and sims.grad.abs().sum() > 0


def test_encoder_errors():
    enc = _tiny_encoder()
    with pytest.raises(ConfigError, match="refs"):
        enc(torch.randn(1, 3, 4, 8, 8), torch.rand(1, 3))
    with pytest.raises(ConfigError, match="sims"):
        enc(torch.randn(1, 3, 4, 16, 16), torch.rand(1, 2))
    with pytest.raises(ConfigError, match="divisible"):
        TextureEncoder(dim=60, heads=7)
    with pytest.raises(ConfigError, match="multiple"):
        TextureEncoder(patch=16, token_patch=3)


# ------------------------------------------------------------------------------------------------
# Procedural textures and crop selection
def test_procedural_textures_shapes_range_determinism():
    for kind in TEXTURE_KINDS:
        a = procedural_textures(kind, 4, 64, generator=_gen(0))
        assert a.shape == (4, 3, 64, 64) and a.dtype == torch.float32
        assert a.min() >= 0 and a.max() <= 1
        assert a.std() > 0.05  # not flat
        assert not torch.equal(a[0], a[1])  # random parameters per image
        assert torch.equal(a, procedural_textures(kind, 4, 64, generator=_gen(0)))
        assert not torch.equal(a, procedural_textures(kind, 4, 64, generator=_gen(1)))
    with pytest.raises(ConfigError, match="unknown kind"):
        procedural_textures("plaid", 2, generator=_gen(0))
    assert procedural_textures("dots", 0, generator=_gen(0)).shape == (0, 3, 128, 128)


def test_procedural_kinds_differ():
    # same generator state for every kind: still different images, and different spectra
    def spectrum(img):
        gray = img.mean(1)
        power = torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs().square().mean(0)
        return power / power.sum()

    imgs = {kind: procedural_textures(kind, 16, 64, generator=_gen(3)) for kind in TEXTURE_KINDS}
    spectra = {kind: spectrum(x) for kind, x in imgs.items()}
    for i, a in enumerate(TEXTURE_KINDS):
        for b in TEXTURE_KINDS[i + 1 :]:
            assert (imgs[a] - imgs[b]).abs().mean() > 0.05, (a, b)
            assert (spectra[a] - spectra[b]).abs().sum() > 0.1, (a, b)


def test_procedural_dataset():
    images, labels = procedural_dataset(3, 32, generator=_gen(0))
    assert images.shape == (3 * len(TEXTURE_KINDS), 3, 32, 32)
    assert labels.dtype == torch.long and labels.tolist() == [
        i for i in range(len(TEXTURE_KINDS)) for _ in range(3)
    ]
    images2, labels2 = procedural_dataset(2, 32, generator=_gen(0), kinds=("noise", "dots"))
    assert labels2.tolist() == [0, 0, 1, 1]
    assert torch.equal(images2[:2], procedural_textures("noise", 2, 32, generator=_gen(0)))


def test_select_texture_crops():
    img = torch.full((1, 3, 200, 300), 0.5)
    img[..., :, 150:] = procedural_textures("checkers", 1, 200, generator=_gen(0))[..., :, :150]
    crops = select_texture_crops(img, crop=64, per_image=5, generator=_gen(1), max_tries=50)
    assert crops.shape == (5, 3, 64, 64)
    assert all(c.std() >= 0.02 for c in crops)
    again = select_texture_crops(img, crop=64, per_image=5, generator=_gen(1), max_tries=50)
    assert torch.equal(crops, again)
    # the flat image gives nothing; the small one is skipped; sizes may differ in an iterator
    flat, small = torch.full((3, 100, 100), 0.3), torch.rand(3, 40, 40)
    big = procedural_textures("noise", 1, 96, generator=_gen(2))
    out = select_texture_crops(iter([flat, small, big]), crop=64, per_image=3, generator=_gen(3))
    assert out.shape == (3, 3, 64, 64)
    assert select_texture_crops([flat], crop=64, generator=_gen(3)).shape == (0, 3, 64, 64)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        select_texture_crops(torch.full((1, 3, 64, 64), 255.0), crop=32)
