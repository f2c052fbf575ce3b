"""State dict + detected family → an `SDModel` on the compute device.

Modules are created on the meta device (no memory, no random init) and receive the checkpoint tensors by
`load_state_dict(assign=True)`, so weights are allocated once. Every key and shape is checked first, so a
bad checkpoint is refused with the names of its missing, unexpected and mismatched tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sdserver.errors import ModelLoadError
from sdserver.models.family_base import UNET, VAE, Component, FamilyMatch, ModelSpec, text_encoder_component
from sdserver.models.nn.clip import CLIPTextModel
from sdserver.models.nn.unet import UNetModel
from sdserver.models.nn.vae import AutoencoderKL
from sdserver.models.sd_model import SDModel
from sdserver.models.tokenizer import CLIPTokenizer

_LISTED = 8  # names per problem kind in an error message


def component_modules(spec: ModelSpec) -> dict[str, nn.Module]:
    """Fresh modules on the meta device for each component of `spec`."""
    with torch.device("meta"):
        modules: dict[str, nn.Module] = {UNET: UNetModel(spec.unet), VAE: AutoencoderKL(spec.vae)}
        for i, cfg in enumerate(spec.text_encoders):
            modules[text_encoder_component(i)] = CLIPTextModel(cfg)
    return modules


def _squeezes_to(given: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Linear [C, C] vs 1x1 conv [C, C, 1, 1]: the same weights, stored either way by different exporters."""
    return given != wanted and [d for d in given if d != 1] == [d for d in wanted if d != 1] and given[:2] == wanted[:2]


def _names(keys: list[str], prefix: str) -> str:
    shown = ", ".join(prefix + k for k in keys[:_LISTED])
    return shown + (f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else "")


def _shape(value: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def check_component(name: str, expected: Mapping[str, tuple[int, ...]], given: Component) -> list[str]:
    """Problems between a module's expected shapes and a checkpoint component, as messages (empty: fine)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        k
        for k in set(expected) & set(given)
        if _shape(given[k]) != expected[k] and not _squeezes_to(_shape(given[k]), expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{name}: missing tensors {_names(missing, given.prefix)}")
    if unexpected:
        problems.append(f"{name}: unexpected tensors {_names(unexpected, given.prefix)}")
    for k in mismatched[:_LISTED]:
        problems.append(
            f"{name}: tensor {given.prefix}{k} has shape {list(_shape(given[k]))}, "
            f"the model expects {list(expected[k])}"
        )
    if len(mismatched) > _LISTED:
        problems.append(f"{name}: {len(mismatched) - _LISTED} more tensors with mismatched shapes")
    return problems


def _prepare(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            tensor = tensor.reshape(expected[key])
        # Integer tensors (none in SD today) keep their type; float weights take the compute dtype.
        target = dtype if tensor.is_floating_point() else tensor.dtype
        out[key] = tensor.to(device=device, dtype=target)
    return out


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    match: FamilyMatch,
    dtype: torch.dtype,
    device: torch.device | str,
    tokenizer: CLIPTokenizer | None = None,
    *,
    vae_dtype: torch.dtype | None = None,
) -> SDModel:
    """An inference-ready SDModel from a checkpoint's tensors; raises ModelLoadError naming bad tensors.
    `vae_dtype` keeps the VAE in another dtype than the rest (A1111's --no-half-vae: fp16 SDXL VAEs overflow)."""
    device = torch.device(device)
    family, spec = match.family, match.spec
    parts = family.split(state_dict)
    modules = component_modules(spec)
    converted = {
        name: Component(parts[name].prefix, family.convert(name, dict(parts[name]))) for name in modules
    }
    expected = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in modules.items()}
    problems = [p for name in modules for p in check_component(name, expected[name], converted[name])]
    if problems:
        raise ModelLoadError(f"checkpoint doesn't fit the {family.name} architecture: " + "; ".join(problems))
    for name, module in modules.items():
        module_dtype = vae_dtype if name == VAE and vae_dtype is not None else dtype
        prepared = _prepare(converted[name], expected[name], module_dtype, device)
        module.load_state_dict(prepared, strict=True, assign=True)
        module.eval().requires_grad_(False)
    text_encoders = [modules[text_encoder_component(i)] for i in range(len(spec.text_encoders))]
    return SDModel(
        spec,
        modules[UNET],  # type: ignore[arg-type]
        modules[VAE],  # type: ignore[arg-type]
        text_encoders,  # type: ignore[arg-type]
        tokenizer or CLIPTokenizer.load(),
    )
