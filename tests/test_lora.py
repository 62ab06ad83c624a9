"""Target selection on the real SD 2.1 UNet structure (meta device) and the peft helpers."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from diffsr import lora
from diffsr.synthetic import meta_unet


def test_pisa_targets_on_sd21_unet():
    unet = meta_unet("sd21")
    targets = lora.unet_lora_targets(unet)
    assert len(targets) == 258
    assert len(set(targets)) == 258
    by_loc = collections.Counter(lora.location(t) for t in targets)
    assert by_loc == {"encoder": 94, "decoder": 148, "others": 16}
    kinds = collections.Counter(type(unet.get_submodule(t)).__name__ for t in targets)
    assert kinds == {"Linear": 192, "Conv2d": 66}
    assert not any("time_emb_proj" in t or "norm" in t for t in targets)
    assert "conv_in" in targets and "conv_out" in targets
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in targets


def test_s3diff_unet_targets_exclude_conv_in():
    targets = lora.unet_lora_targets(meta_unet("sd21"), exclude=["conv_in"])
    assert len(targets) == 257 and "conv_in" not in targets


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, v):
        return self.lin(v), self.conv(x)


def _fill(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(model, name).items()}
    lora.load_lora_tensors(model, name, tensors)
    return tensors


def test_per_sample_adapters_equal_separate_passes():
    torch.manual_seed(0)
    net = _Net()
    lora.add_lora(net, "a", ["lin", "conv"], rank=2, alpha=8)
    _fill(net, "a", 1)
    x, v = torch.randn(2, 3, 7, 7), torch.randn(2, 6)
    handles = lora.route_adapters(net)
    with lora.adapter_batch(["__base__", "a"]):
        mixed = net(x, v)
    outside = net(x, v)  # outside the block the layers run as configured (adapter "a" on every sample)
    for h in handles:
        h.remove()
    for layer in (net.lin, net.conv):  # the same layers with the adapter switched off and on
        layer.enable_adapters(False)
    base = net(x, v)
    for layer in (net.lin, net.conv):
        layer.enable_adapters(True)
    full = net(x, v)
    for m, b, f in zip(mixed, base, full, strict=True):
        torch.testing.assert_close(m[0], b[0])
        torch.testing.assert_close(m[1], f[1])
        assert not torch.allclose(b[1], f[1])
    for o, f in zip(outside, full, strict=True):
        torch.testing.assert_close(o, f)


def test_fold_adapters_equals_hand_merge():
    torch.manual_seed(0)
    net = _Net()
    w_lin, w_conv = net.lin.weight.clone(), net.conv.weight.clone()
    lora.add_lora(net, "a", ["lin", "conv"], rank=2, alpha=8)
    t = _fill(net, "a", 3)
    lora.fold_adapters(net)
    assert type(net.lin) is nn.Linear and type(net.conv) is nn.Conv2d
    s = 8 / 2
    torch.testing.assert_close(
        net.lin.weight, w_lin + s * t["lin.lora_B.a.weight"] @ t["lin.lora_A.a.weight"]
    )
    a, b = t["conv.lora_A.a.weight"], t["conv.lora_B.a.weight"]
    delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(net.conv.weight, w_conv + s * delta)


def test_load_lora_tensors_checks_keys_and_shapes():
    from diffsr.errors import CheckpointError

    net = _Net()
    lora.add_lora(net, "a", ["lin"], rank=2, alpha=8)
    good = lora.lora_state_dict(net, "a")
    with pytest.raises(CheckpointError, match="missing"):
        lora.load_lora_tensors(net, "a", {})
    bad = {k: torch.zeros(3, 3) for k in good}
    with pytest.raises(CheckpointError, match="shape"):
        lora.load_lora_tensors(net, "a", bad)
