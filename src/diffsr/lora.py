"""LoRA helpers on top of peft: target selection, loading tensors, merging, per-sample adapters."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .errors import CheckpointError

# PiSA-SR and S3Diff select UNet LoRA targets by these substrings of parameter names.
UNET_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip


def unet_lora_targets(
    unet: nn.Module, patterns: Sequence[str] = UNET_PATTERNS, exclude: Iterable[str] = ()
) -> list[str]:
    """Module names whose weight name contains one of `patterns` (bias and norm parameters excluded),
    in parameter order — the authors' rule (258 modules on the SD 2.1 UNet). Works on the meta device."""
    exclude = set(exclude)
    names = []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n or not any(p in n for p in patterns):
            continue
        module = n.removesuffix(".weight")
        if module not in exclude:
            names.append(module)
    return names


def location(module: str) -> str:
    """PiSA-SR's split of the UNet: 'encoder' (down_blocks, conv_in), 'decoder' (up_blocks, conv_out), 'others'."""
    if "down_blocks" in module or "conv_in" in module:
        return "encoder"
    if "up_blocks" in module or "conv_out" in module:
        return "decoder"
    return "others"


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in `model`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _config(targets: str | Sequence[str], rank: int = 4, alpha: float = 8):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=targets if isinstance(targets, str) else list(targets),
    )


def matching_modules(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the Linear/Conv2d modules peft wraps for `targets` (a regex, fully matched, or a list
    of names/suffixes), by peft's own matching rule. Works on the meta device."""
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = _config(targets)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and check_target_module_exists(cfg, n)
    ]


def add_lora(model: nn.Module, name: str, targets: str | Sequence[str], rank: int, alpha: float) -> None:
    """Inject a peft LoRA adapter `name` (Gaussian init, B = 0) on the `targets` modules of `model`
    (a list of module names/suffixes, or a regex string fully matched against module names)."""
    from peft import inject_adapter_in_model

    cfg = _config(targets, rank, alpha)
    with warnings.catch_warnings():  # "Already found a peft_config": several adapters are what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(cfg, model, adapter_name=name)


def lora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name`, keyed as in model.state_dict() ('…lora_A.<name>.weight')."""
    tag = f".{name}."
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k and tag in k}


def load_lora_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (keys as lora_state_dict) into adapter `name`; every adapter tensor must be given."""
    own = lora_state_dict(model, name)
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        what = (
            f"missing {len(missing)} (e.g. {missing[0]})"
            if missing
            else f"unexpected {len(extra)} (e.g. {extra[0]})"
        )
        raise CheckpointError(f"LoRA '{name}' tensors do not fit the model: {what}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise CheckpointError(
                    f"LoRA tensor {k}: shape {tuple(v.shape)} != model {tuple(params[k].shape)}"
                )
            params[k].copy_(v)


def fold_adapters(model: nn.Module) -> None:
    """Merge every adapter into the base weights for good and put the plain base layers back
    (peft's merge_and_unload). Later adapters can then run unmerged, which peft's mixed-batch
    inference needs: it refuses layers that carry any merged adapter."""
    for lname, layer in lora_layers(model):
        layer.merge()
        parent_name, _, child = lname.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())


# Per-sample adapter names of the current call (peft mixed-batch inference). A context variable, so
# that concurrent calls on one model (threads) each route their own batch.
_ADAPTER_NAMES: ContextVar[list[str] | None] = ContextVar("diffsr_adapter_names", default=None)


def route_adapters(model: nn.Module) -> list:
    """Install, once, a forward pre-hook on every LoRA layer of `model` that passes the adapter names
    of the enclosing `adapter_batch` to peft (as peft's own PeftModel does); outside such a block the
    layers run as configured. Returns the hook handles."""

    def hook(_module, args, kwargs):
        names = _ADAPTER_NAMES.get()
        if names is None:
            return None
        kwargs["adapter_names"] = names
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for _, layer in lora_layers(model)]


@contextmanager
def adapter_batch(adapter_names: Sequence[str]):
    """Within the block, models prepared with `route_adapters` apply adapter_names[i] to batch element
    i ('__base__' for none). Every batch a LoRA layer sees must have len(adapter_names) elements."""
    token = _ADAPTER_NAMES.set(list(adapter_names))
    try:
        yield
    finally:
        _ADAPTER_NAMES.reset(token)


def lora_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of peft's (lora_A, lora_B) weights for a Linear or Conv2d: A keeps a conv's kernel, B is 1x1."""
    if isinstance(module, nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    raise TypeError(f"LoRA supports Linear and Conv2d, not {type(module).__name__}")


def random_lora(
    model: nn.Module,
    targets: Sequence[str],
    adapter: str,
    rank: int,
    *,
    generator: torch.Generator,
    std: float,
) -> dict[str, torch.Tensor]:
    """Random A and B (B non-zero, so the adapter changes outputs) keyed as peft names them."""
    modules = dict(model.named_modules())
    out = {}
    for name in targets:
        a_shape, b_shape = lora_shapes(modules[name], rank)
        out[f"{name}.lora_A.{adapter}.weight"] = torch.randn(a_shape, generator=generator) * std
        out[f"{name}.lora_B.{adapter}.weight"] = torch.randn(b_shape, generator=generator) * std
    return out


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as its base (every LoRA layer bypassed), e.g. the frozen SD UNet that PiSA-SR's
    CSD loss needs, without a second copy of the weights. Trainability is left as it was (peft's
    re-enabling would mark every active adapter trainable)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disable_adapters for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, before, strict=True):
            layer.enable_adapters(not was_disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Activate exactly `names` on every LoRA layer (layers lacking one of them keep the others).

    peft's set_adapter also marks the active adapters trainable; callers set requires_grad after."""
    for _, layer in lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
