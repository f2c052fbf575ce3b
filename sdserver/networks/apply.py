"""Applying LoRA-family networks to a model's weights for one request, and restoring them bit for bit.

Each touched parameter's original tensor is copied on first touch and copied back on restore: the base weights
come back exactly (no subtraction, so no rounding drift), and a request without networks after one with them
gives the original image. Deltas are computed in float32, summed onto the float32 original and cast once to
the parameter's dtype. (A1111 adds network by network, rounding to the weight dtype after each; with one
network the results agree.)

Everything that can fail on the request's input (unknown names, unreadable files, unsupported network types)
fails before the first weight changes. The caller must not run two requests on one model at once; the engine's
one worker per model guarantees that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import torch
from torch import nn

from sdserver.errors import UnsupportedFeature
from sdserver.models.family_base import UNET, text_encoder_component
from sdserver.networks.delta import NetworkType, ShapeMismatch, module_delta, network_type, unsupported_kind
from sdserver.networks.lora_keys import Target
from sdserver.networks.registry import NetworkLibrary


class NetworkCall(Protocol):
    """What the prompt parser yields per `<lora:...>` tag (`sdserver.pipeline.extra_networks.LoraCall`)."""

    name: str
    te_weight: float
    unet_weight: float
    dyn: int | None


@dataclass(frozen=True)
class _Patch:
    network: str  # the name the prompt used
    target: Target
    kind: NetworkType
    parts: dict[str, torch.Tensor]
    multiplier: float
    dyn: int | None


@dataclass
class AppliedNetworks:
    """The networks active on a model until `restore()` (or the end of a `with` block).

    `hashes`: prompt name → 12-hex short hash, in prompt order (A1111's `Lora hashes`; the infotext writer
    removes `:` and `,` from names). `unmatched`: per network, how many of its modules name no module of this
    model (A1111 ignores those). `errors`: per network, modules whose shape didn't fit (A1111 skips those and
    notes "Networks with errors" in the infotext comments).
    """

    component_modules: dict[str, nn.Module]
    hashes: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    _backups: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _created_biases: list[tuple[str, str]] = field(default_factory=list)

    def __enter__(self) -> AppliedNetworks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    @property
    def touched(self) -> list[tuple[str, str]]:
        """(component, parameter name) of every parameter currently changed."""
        return list(self._backups)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every touched parameter back exactly as it was; safe to call twice."""
        for (component, name), original in self._backups.items():
            param = self.component_modules[component].get_parameter(name)
            param.copy_(original)
        for component, module_name in self._created_biases:
            module = self.component_modules[component].get_submodule(module_name)
            module.bias = None
        self._backups.clear()
        self._created_biases.clear()

    def _backup(self, component: str, name: str, param: torch.Tensor, device: torch.device | str) -> None:
        if (component, name) not in self._backups:
            self._backups[(component, name)] = param.detach().to(device, copy=True)


def component_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{"unet": ..., "text_encoder": ..., "text_encoder_2": ...} of an `SDModel`."""
    modules: dict[str, nn.Module] = {UNET: model.unet}  # type: ignore[dict-item]
    for index, encoder in enumerate(model.text_encoders):  # type: ignore[attr-defined]
        modules[text_encoder_component(index)] = encoder
    return modules


def _plan(
    model: nn.Module, calls: Sequence[NetworkCall], library: NetworkLibrary, applied: AppliedNetworks
) -> list[_Patch]:
    """Resolve and check every call and module before any weight changes."""
    entries = [library.find(call.name) for call in calls]
    table = library.target_table(model)
    patches: list[_Patch] = []
    for call, entry in zip(calls, entries):
        data = library.load(entry)
        applied.hashes[call.name] = library.short_hash(entry)
        unmatched = 0
        for module_key, parts in data.modules.items():
            target = table.resolve(module_key)
            if target is None:
                unmatched += 1
                continue
            unsupported = unsupported_kind(parts)
            kind = None if unsupported else network_type(parts)
            if kind is None:
                what = unsupported or "an unknown type with tensors " + ", ".join(sorted(parts))
                raise UnsupportedFeature(
                    f"LoRA '{call.name}': module {module_key} is {what}, which isn't supported", field="prompt"
                )
            multiplier = call.te_weight if target.is_text_encoder else call.unet_weight
            if multiplier == 0:
                continue  # exactly the base weights, as A1111's `w + 0 * delta` gives
            patches.append(_Patch(call.name, target, kind, dict(parts), float(multiplier), call.dyn))
        applied.unmatched[call.name] = unmatched
    return patches


def _grouped(patches: Iterable[_Patch]) -> dict[Target, list[_Patch]]:
    groups: dict[Target, list[_Patch]] = {}
    for patch in patches:
        groups.setdefault(patch.target, []).append(patch)
    return groups


@torch.no_grad()
def _apply_target(applied: AppliedNetworks, target: Target, patches: list[_Patch], backup_device: str) -> None:
    module = applied.component_modules[target.component].get_submodule(target.module)
    weight: nn.Parameter = module.weight  # type: ignore[assignment]
    weight_sum = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    bias_sum: torch.Tensor | None = None
    used = 0
    for patch in patches:
        parts = {k: v.to(weight.device) for k, v in patch.parts.items()}
        try:
            delta, bias = module_delta(patch.kind, parts, weight.shape, patch.dyn)
        except (ShapeMismatch, RuntimeError):
            applied.errors[patch.network] = applied.errors.get(patch.network, 0) + 1
            continue
        weight_sum += delta * patch.multiplier
        if bias is not None:
            bias = bias.reshape(-1) * patch.multiplier
            bias_sum = bias if bias_sum is None else bias_sum + bias
        used += 1
    if not used:
        return
    applied._backup(target.component, target.param, weight, backup_device)
    weight.copy_((weight.float() + weight_sum).to(weight.dtype))
    if bias_sum is None:
        return
    existing = getattr(module, "bias", None)
    bias_name = target.module + ".bias"
    if existing is None:
        module.bias = nn.Parameter(bias_sum.to(weight.dtype), requires_grad=False)
        applied._created_biases.append((target.component, target.module))
    else:
        applied._backup(target.component, bias_name, existing, backup_device)
        existing.copy_((existing.float() + bias_sum).to(existing.dtype))


def apply_networks(
    model: nn.Module, calls: Sequence[NetworkCall], library: NetworkLibrary, *, backup_device: str = "cpu"
) -> AppliedNetworks:
    """Add each call's network × its multiplier (te_weight for text-encoder modules, unet_weight for UNet ones)
    to `model`'s weights in place; use the result as a context manager or call `.restore()`.

    Originals are kept on `backup_device` (CPU by default, as A1111 does, so VRAM isn't doubled).
    Raises InvalidRequest (unknown name, unreadable file) or UnsupportedFeature before changing anything."""
    applied = AppliedNetworks(component_modules(model))
    if not calls:
        return applied
    patches = _plan(model, calls, library, applied)
    try:
        for target, group in _grouped(patches).items():
            _apply_target(applied, target, group, backup_device)
    except BaseException:
        applied.restore()
        raise
    return applied
