"""Loading SD parts: folders, Hub ids offline, schedules, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from diffsr.devices import resolve_device, resolve_dtype
from diffsr.errors import ConfigError, WeightsNotFoundError, cli_messages
from diffsr.sd import alphas_cumprod_from_config, load_sd_parts, resolve_base
from diffsr.synthetic import SCHEDULER


def test_alphas_cumprod_sd_schedule():
    ac = alphas_cumprod_from_config(SCHEDULER)
    assert ac.shape == (1000,)
    assert ac[999].item() == pytest.approx(0.004660, abs=5e-7)  # DESIGN §4: ᾱ_999
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert ac[1].item() == pytest.approx(((1 - betas[0]) * (1 - betas[1])).item(), rel=1e-12)


def test_resolve_base_folder_and_missing(tmp_path, tiny_sd_dir):
    assert resolve_base(str(tiny_sd_dir), default="x/y", env="DIFFSR_TEST_BASE") == tiny_sd_dir
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"missing vae/, scheduler/"):
        resolve_base(str(tmp_path / "half"), default="x/y", env="DIFFSR_TEST_BASE")
    with pytest.raises(WeightsNotFoundError, match="no such model folder"):
        resolve_base(str(tmp_path / "nope"), default="x/y", env="DIFFSR_TEST_BASE")


def test_resolve_base_env(monkeypatch, tiny_sd_dir):
    monkeypatch.setenv("DIFFSR_TEST_BASE", str(tiny_sd_dir))
    assert resolve_base(None, default="x/y", env="DIFFSR_TEST_BASE") == tiny_sd_dir


def test_hub_id_offline_error_names_flag_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_base(None, default="stabilityai/stable-diffusion-2-1-base", env="DIFFSR_PISA_BASE")
    msg = str(e.value)
    assert "\n" not in msg
    assert (
        "stabilityai/stable-diffusion-2-1-base" in msg
        and "base=/path/to/folder" in msg
        and "DIFFSR_PISA_BASE" in msg
    )
    with (
        cli_messages(),
        pytest.raises(WeightsNotFoundError, match="--base /path/to/folder or set DIFFSR_PISA_BASE"),
    ):
        resolve_base(None, default="stabilityai/stable-diffusion-2-1-base", env="DIFFSR_PISA_BASE")


def test_load_sd_parts_from_folder(tiny_sd_dir):
    parts = load_sd_parts(tiny_sd_dir)
    assert parts.unet.config.in_channels == 4 and parts.vae.config.scaling_factor == 0.18215
    ids = parts.tokenizer(
        [""], max_length=77, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.shape == (1, 77)
    assert not any(p.requires_grad for p in parts.unet.parameters())


def test_devices_and_dtypes():
    cpu = resolve_device("cpu")
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(None, cpu) == torch.float32
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="not one of"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def _partial_hub_cache(cache, repo_id, source, drop):
    """A huggingface_hub cache holding `repo_id` at one commit with the files of `source` except `drop`
    (what an interrupted download leaves)."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(source, snap)
    for rel in drop:
        (snap / rel).unlink()
    return snap


def test_partial_hub_download_is_resumed_not_loaded(monkeypatch, tmp_path, tiny_sd_dir):
    """A snapshot cut short (vae weights missing) is never handed to the loader: offline it is a
    one-line error naming what is missing; online the download is called again to fetch the rest."""
    import shutil

    import huggingface_hub

    repo_id = "org/tiny-sd"
    cache = tmp_path / "cache"
    snap = _partial_hub_cache(cache, repo_id, tiny_sd_dir, ["vae/diffusion_pytorch_model.safetensors"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_base(repo_id, default="x/y", env="DIFFSR_TEST_BASE")
    msg = str(e.value)
    assert (
        "is only partly in the Hugging Face cache" in msg and "vae/diffusion_pytorch_model.safetensors" in msg
    )
    assert "\n" not in msg

    real = huggingface_hub.snapshot_download
    calls = []

    def online(repo, **kw):
        calls.append(kw.get("local_files_only", False))
        if kw.get("local_files_only"):
            return real(repo, **kw)
        # the network call: huggingface_hub fetches the missing file into the same snapshot
        shutil.copy(tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors", snap / "vae")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", online)
    assert resolve_base(repo_id, default="x/y", env="DIFFSR_TEST_BASE") == snap
    assert calls == [True, False]
    assert load_sd_parts(snap).vae.config.scaling_factor == 0.18215
    calls.clear()
    assert resolve_base(repo_id, default="x/y", env="DIFFSR_TEST_BASE") == snap  # complete: no network
    assert calls == [True]


@pytest.mark.parametrize("stored_under_own_names", [True, False])
def test_own_aligned_reads_weights_from_their_file_not_through_the_mapping(
    tmp_path, monkeypatch, stored_under_own_names
):
    """Weights memory-mapped at file offsets (as diffusers leaves them) become owned and 64-byte
    aligned with the same values: read from the safetensors file when stored there under their own
    names (no copy through the mapping, whose pages would stay resident), else cloned."""
    from safetensors.torch import load_file, save_file

    from diffsr.sd import own_aligned

    m = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Conv2d(3, 2, 3))
    want = {k: v.detach().clone() for k, v in m.state_dict().items()}
    f = tmp_path / "m.safetensors"
    prefix = "" if stored_under_own_names else "renamed."
    save_file({prefix + k: v for k, v in want.items()}, f)
    mapped = load_file(f)
    m.load_state_dict({k: mapped[prefix + k] for k in want}, assign=True)
    # no size here is a multiple of 64 bytes, so of two neighbours in the file one is unaligned
    assert any(v.data_ptr() % 64 for v in m.state_dict().values())
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or clone(t, *a, **k))
    own_aligned(m, [f])
    got = m.state_dict()
    assert all(got[k].data_ptr() % 64 == 0 and torch.equal(got[k], want[k]) for k in want)
    assert (len(clones) == 0) == stored_under_own_names


def test_own_aligned_passes_over_files_that_are_not_safetensors(tmp_path):
    from diffsr.sd import own_aligned

    (tmp_path / "cut.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{")  # cut short
    (tmp_path / "junk.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")  # not a header
    m = torch.nn.Linear(3, 2)
    m.weight.data = torch.arange(7.0)[1:].reshape(2, 3)  # a view 4 bytes into its storage: unaligned
    own_aligned(m, [tmp_path / "cut.safetensors", tmp_path / "junk.safetensors", tmp_path / "missing"])
    assert m.weight.data_ptr() % 64 == 0 and torch.equal(m.weight, torch.arange(1.0, 7.0).reshape(2, 3))
