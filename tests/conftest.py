"""Shared fixtures: tiny random-weight SD models and PiSA-SR weights, built in-process, offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A diffusers-format folder of the tiny random SD model."""
    from diffsr.synthetic import write_random_sd_folder

    return write_random_sd_folder(tmp_path_factory.mktemp("tiny-sd"), "tiny", seed=0)


@pytest.fixture
def tiny_parts():
    """Fresh tiny SD parts (methods inject adapters into them, so never share across tests)."""
    from diffsr.synthetic import random_sd_parts

    return random_sd_parts("tiny", seed=0)


@pytest.fixture(scope="session")
def pisa_weights():
    """Random PiSA-SR LoRA sets on the tiny UNet's 258-rule targets."""
    from diffsr.methods.pisa import random_weights
    from diffsr.synthetic import random_sd_parts

    unet = random_sd_parts("tiny", seed=0, text_encoder=False).unet
    return random_weights(unet, seed=1, std=0.05)


@pytest.fixture
def pisa(tiny_parts, pisa_weights):
    from diffsr.methods.pisa import PiSASR

    return PiSASR.from_parts(tiny_parts, pisa_weights)


@pytest.fixture(scope="session")
def pisa_dir(tmp_path_factory, pisa_weights):
    """PiSA-SR weights in diffsr's folder format."""
    return pisa_weights.save(tmp_path_factory.mktemp("pisa") / "weights")


@pytest.fixture(scope="session")
def s3diff_weights():
    """Random S3Diff weights (LoRA, conv_in, modulation with O(1) init, estimator) for the tiny model."""
    from diffsr.methods.s3diff import random_weights
    from diffsr.synthetic import random_sd_parts

    parts = random_sd_parts("tiny", seed=0, text_encoder=False)
    return random_weights(parts.unet, parts.vae, seed=1, std=0.05)


@pytest.fixture
def s3diff(tiny_parts, s3diff_weights):
    from diffsr.methods.s3diff import S3Diff

    return S3Diff.from_parts(tiny_parts, s3diff_weights)


@pytest.fixture(scope="session")
def s3diff_dir(tmp_path_factory, s3diff_weights):
    """S3Diff weights in diffsr's folder format (estimator included)."""
    return s3diff_weights.save(tmp_path_factory.mktemp("s3diff") / "weights")
