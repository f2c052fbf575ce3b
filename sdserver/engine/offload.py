"""--medvram / --lowvram: model parts on the GPU only while they run (A1111's sequential offload).

medvram: each text encoder, the UNet and the VAE is a unit; a unit comes to the compute device when one of its
modules' forward starts and stays until another unit's starts, which sends it back to system memory. lowvram:
the same, but the UNet's blocks (each input block, the middle block, each output block) are units of their own,
so only one block's weights are on the GPU at a time. The UNet's small remainder (time and label embeddings,
output layer) stays on the device under lowvram, and its output layer under medvram, so `SDModel.device` names
the compute device throughout and the pipeline makes its tensors there.

The moves are forward pre-hooks on the units' modules (a hook also brings that call's tensor arguments along);
nothing is patched. `--medvram-sdxl` is medvram for SDXL models only. On the CPU there is nowhere to offload
to: the flags are accepted and do nothing, with one log line.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdserver.models.sd_model import SDModel

log = logging.getLogger(__name__)

NONE, MEDVRAM, LOWVRAM, MEDVRAM_SDXL = "none", "medvram", "lowvram", "medvram-sdxl"
_UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")

Mover = Callable[[nn.Module, torch.device], None]


def _to_device(module: nn.Module, device: torch.device) -> None:
    module.to(device)


def offload_mode(
    device: torch.device, *, medvram: bool = False, lowvram: bool = False, medvram_sdxl: bool = False
) -> str:
    """The offload mode the flags ask for on `device` (lowvram wins over medvram); NONE off CUDA."""
    wanted = LOWVRAM if lowvram else MEDVRAM if medvram else MEDVRAM_SDXL if medvram_sdxl else NONE
    if wanted != NONE and device.type != "cuda":
        log.info("--%s does nothing on the %s: the weights already live in system memory", wanted, device.type)
        return NONE
    return wanted


@dataclass(frozen=True)
class Unit:
    """Modules that move together; a forward of any `entries` module brings them to the compute device."""

    name: str
    modules: tuple[nn.Module, ...]
    entries: tuple[nn.Module, ...]


def plan(model: SDModel, mode: str) -> tuple[tuple[nn.Module, ...], tuple[Unit, ...]]:
    """(modules that stay on the compute device, units that take turns) of `model` under `mode`."""
    texts = tuple(Unit(f"text_encoder.{i}", (enc,), (enc,)) for i, enc in enumerate(model.text_encoders))
    # The VAE's methods (encode, decode) aren't forwards; its children's forwards are where each begins.
    vae = Unit("vae", (model.vae,), tuple(model.vae.children()))
    unet = model.unet
    if mode == MEDVRAM:
        body = tuple(module for name, module in unet.named_children() if name != "out")
        return (unet.out,), (*texts, Unit("unet", body, (unet,)), vae)
    if mode == LOWVRAM:
        rest = tuple(module for name, module in unet.named_children() if name not in _UNET_BLOCKS)
        blocks = [(f"unet.input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
        blocks.append(("unet.middle_block", unet.middle_block))
        blocks += [(f"unet.output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
        return rest, (*texts, *(Unit(name, (block,), (block,)) for name, block in blocks), vae)
    raise ValueError(f"no offload plan for mode '{mode}'")


def _tensors_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _tensors_to(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """The hooks and the one unit on the device, for one model. Installing moves every unit to `storage`."""

    def __init__(self, model: SDModel, mode: str, device: torch.device, storage: torch.device, move: Mover) -> None:
        self.vae = model.vae  # the module planned for: a VAE swapped in later needs a new plan
        self.device, self.storage, self._move = device, storage, move
        self._active: Unit | None = None
        anchors, units = plan(model, mode)
        for module in anchors:
            move(module, device)
        self._handles = []
        for unit in units:
            for module in unit.modules:
                move(module, storage)
            for entry in unit.entries:
                hook = functools.partial(self._enter, unit)
                self._handles.append(entry.register_forward_pre_hook(hook, with_kwargs=True))

    def _enter(self, unit: Unit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._active is not unit:
            self.park()
            for part in unit.modules:
                self._move(part, self.device)
            self._active = unit
        return _tensors_to(args, self.device), _tensors_to(kwargs, self.device)

    def park(self) -> None:
        """Send the unit on the device (if any) back to storage."""
        if self._active is not None:
            for part in self._active.modules:
                self._move(part, self.storage)
            self._active = None

    def remove(self) -> None:
        self.park()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Offload:
    """The engine's offload policy over every model it runs: `prepare(model)` before a model is used (after a
    load, a switch or a VAE change) installs its hooks once and parks the other models' units."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        *,
        storage: torch.device = torch.device("cpu"),
        move: Mover = _to_device,
    ) -> None:
        self.mode, self.device, self._storage, self._move = mode, torch.device(device), storage, move
        self._models: weakref.WeakKeyDictionary[SDModel, ModelOffload] = weakref.WeakKeyDictionary()

    @property
    def enabled(self) -> bool:
        return self.mode != NONE

    @property
    def storage_device(self) -> torch.device:
        """Where weights are built at load: system memory when offloading, else the compute device."""
        return self._storage if self.enabled else self.device

    def mode_for(self, model: SDModel) -> str:
        if self.mode == MEDVRAM_SDXL:
            return MEDVRAM if model.family == "sdxl" else NONE
        return self.mode

    def prepare(self, model: SDModel) -> None:
        if not self.enabled:
            return
        for other, installed in list(self._models.items()):
            if other is not model:
                installed.park()
        installed = self._models.get(model)
        if installed is not None and installed.vae is model.vae:
            return
        if installed is not None:
            installed.remove()
        mode = self.mode_for(model)
        if mode == NONE:
            self._move(model, self.device)
            return
        self._models[model] = ModelOffload(model, mode, self.device, self._storage, self._move)
