"""Loaded models are stateless: no call changes their weights or what a later call returns, and one
model serves several threads with the results of sequential calls."""

from __future__ import annotations

import threading

import pytest
import torch

from diffsr.methods.pisa import PiSASR
from diffsr.methods.s3diff import S3Diff
from diffsr.synthetic import random_sd_parts


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 16 + 8 * i, 24, generator=g) for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pisa_default_after_adjustable_is_bit_identical_to_a_fresh_load(pisa_weights, dtype):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    model = PiSASR.from_parts(random_sd_parts("tiny", seed=0), pisa_weights, dtype=dtype)
    before = _snapshot(model)
    first = model.predict_default(z)
    pair = model.predict_pair(z)  # the adjustable mode's UNet call
    after = model.predict_default(z)
    fresh = PiSASR.from_parts(random_sd_parts("tiny", seed=0), pisa_weights, dtype=dtype).predict_default(z)
    assert torch.equal(after, first) and torch.equal(after, fresh)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # another batch size: other BLAS blocking
    torch.testing.assert_close(pair[:, 4:], first, atol=tol, rtol=tol)  # ε_pix+sem is the default mode's ε
    now = _snapshot(model)
    assert all(torch.equal(now[k], v) for k, v in before.items())


def test_pisa_end_to_end_default_unchanged_by_adjustable(pisa):
    lr = _images(1)[0]
    first, _ = pisa.restore(lr)
    pisa.adjustable(lr).render(0.3, 1.4)
    assert torch.equal(pisa.restore(lr)[0], first)


def test_s3diff_calls_leave_no_state(s3diff_weights):
    model = S3Diff.from_parts(random_sd_parts("tiny", seed=0), s3diff_weights)
    lr = _images(1)[0]
    before = _snapshot(model)
    first, _ = model.restore(lr)
    model.restore(lr, blur=0.9, noise=0.1, guidance_scale=2.0)
    again, _ = model.restore(lr)
    assert torch.equal(first, again)
    assert model._matrices.get() is None  # nothing left behind for the next call
    now = _snapshot(model)
    assert all(torch.equal(now[k], v) for k, v in before.items())


def _threaded(fn, inputs: list, rounds: int = 2) -> list:
    """Run fn on every input from len(inputs) threads at once, `rounds` times each; all results."""
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                results[i, r] = fn(inputs[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [[results[i, r] for r in range(rounds)] for i in range(len(inputs))]


def test_pisa_two_threads_equal_sequential(pisa_weights):
    """One thread runs the default mode while another runs the adjustable pair on the same model."""
    model = PiSASR.from_parts(random_sd_parts("tiny", seed=0), pisa_weights)
    zs = [torch.randn(1, 4, 16, 16 + 8 * i, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calls = [model.predict_default, model.predict_pair]
    sequential = [calls[i](z) for i, z in enumerate(zs)]
    out = _threaded(lambda job: calls[job[0]](job[1]), list(enumerate(zs)), rounds=3)
    for i in range(2):
        for y in out[i]:
            assert torch.equal(y, sequential[i])


def test_s3diff_two_threads_equal_sequential(s3diff_weights):
    model = S3Diff.from_parts(random_sd_parts("tiny", seed=0), s3diff_weights)
    images = _images(2, seed=4)
    sequential = [model.restore(x, blur=0.2 + 0.5 * i)[0] for i, x in enumerate(images)]
    out = _threaded(lambda job: model.restore(job[1], blur=0.2 + 0.5 * job[0])[0], list(enumerate(images)))
    for i in range(2):
        for y in out[i]:
            assert torch.equal(y, sequential[i])


def test_s3diff_gradient_checkpointing_recomputes_with_the_calls_matrices(s3diff_weights):
    """Backward runs after the `modulated` block has closed: the recomputation must still see the
    call's matrices, and give the gradients of a run without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = S3Diff.from_parts(random_sd_parts("tiny", seed=0), s3diff_weights)
        unet = model.unet
        names = [n for n, p in unet.named_parameters() if ".lora_" in n]
        for n, p in unet.named_parameters():
            p.requires_grad_(n in names)
        if checkpointing:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=model.checkpoint)
        unet.train()
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with model.modulated(torch.tensor([[0.2, 0.7], [0.9, 0.1]])):
            eps = unet(z, model.timestep, encoder_hidden_states=model.pos_embeds.expand(2, -1, -1)).sample
        eps.square().mean().backward()  # outside the block
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if n in names})
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-4)
