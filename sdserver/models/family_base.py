"""What a model family is: how to recognise its checkpoints, read its configs, and split its tensors.

A family maps the single-file checkpoint layout onto the component modules of `sdserver.models.nn`:
`split` strips the checkpoint prefixes (`model.diffusion_model.` → unet, ...), `convert` rewrites tensors whose
original layout differs from the module's (OpenCLIP's fused attention, for instance), and `spec` derives the
component configs from the shapes of the split keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch

from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig

V = TypeVar("V")

UNET = "unet"
VAE = "vae"


def text_encoder_component(index: int) -> str:
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model of a family, besides its weights."""

    family: str
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction_type: str = "eps"  # "eps" or "v"
    # Where prediction_type came from: default, metadata, marker, yaml, override or heuristic.
    prediction_source: str = "default"
    default_size: tuple[int, int] = (512, 512)
    # Whether the UNet takes the pooled text embedding (SDXL); SD 1.x/2.x ignore it.
    uses_pooled: bool = False
    # Whether the context is the encoder layer's raw output (SDXL) rather than the final-layer-normed one.
    final_layer_norm: bool = True
    # Trained with a zero-terminal-SNR schedule (marked by a `ztsnr` tensor, as v-prediction SDXL finetunes are).
    zero_terminal_snr: bool = False
    # The text layer a family always conditions on (2: penultimate), ignoring the user's clip skip; None: use it.
    fixed_text_layer: int | None = None

    @property
    def is_inpainting(self) -> bool:
        # SD inpainting UNets take latent (4) + mask (1) + masked-image latent (4).
        return self.unet.in_channels == self.unet.out_channels * 2 + 1


@dataclass(frozen=True)
class Component(Mapping[str, V]):
    """One component's entries with the checkpoint prefix stripped; `prefix` is the one the file used."""

    prefix: str
    entries: dict[str, V] = field(default_factory=dict)

    def __getitem__(self, key: str) -> V:
        return self.entries[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class Family(ABC):
    """A checkpoint family. Subclasses set `name`, `prefixes`, `default_prefixes` and implement the rest."""

    name: ClassVar[str]
    # (checkpoint prefix, component) pairs, most specific first: a key goes to the first prefix it starts with.
    prefixes: ClassVar[tuple[tuple[str, str], ...]]
    # The prefix to name a component's keys by when the checkpoint has none of them.
    default_prefixes: ClassVar[Mapping[str, str]]
    # Key suffixes the checkpoint may carry that the modules don't have (buffers, training state).
    ignored_suffixes: ClassVar[tuple[str, ...]] = ()
    # Key prefixes of training-only state inside a component: the VAE's adversarial loss (discriminator,
    # LPIPS network, logvar) that full LDM training checkpoints carry.
    ignored_prefixes: ClassVar[tuple[str, ...]] = ("first_stage_model.loss.",)

    @abstractmethod
    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether a checkpoint with these tensor shapes belongs to this family."""

    @abstractmethod
    def spec(self, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> ModelSpec:
        """Component configs from the (unsplit) checkpoint shapes and the file's metadata."""

    def components(self) -> list[str]:
        return list(dict.fromkeys(component for _, component in self.prefixes))

    def split(self, entries: Mapping[str, V]) -> dict[str, Component[V]]:
        """Checkpoint entries (tensors or shapes) per component, prefixes stripped; other keys dropped."""
        found: dict[str, tuple[str | None, dict[str, V]]] = {c: (None, {}) for c in self.components()}
        for key, value in entries.items():
            if key.endswith(self.ignored_suffixes) or key.startswith(self.ignored_prefixes):
                continue
            for prefix, component in self.prefixes:
                if key.startswith(prefix):
                    used, stripped = found[component]
                    stripped.setdefault(key[len(prefix) :], value)
                    found[component] = (used or prefix, stripped)
                    break
        return {
            component: Component(prefix or self.default_prefixes[component], stripped)
            for component, (prefix, stripped) in found.items()
        }

    def native_size(self, prediction_type: str) -> tuple[int, int]:
        """The (width, height) the family's models were trained at, for a given prediction type."""
        return (512, 512)

    def guess_prediction(self, state_dict: Mapping[str, torch.Tensor]) -> str | None:
        """A guess from the weights for families whose eps and v variants look alike; None: keep the default."""
        return None

    def convert(self, component: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewrite a component's tensors into the module layout; the identity for layouts that already match."""
        return tensors

    def convert_shapes(self, component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """`convert` applied to shapes only, for detection on stripped fixtures."""
        return shapes


@dataclass(frozen=True)
class FamilyMatch:
    family: Family
    spec: ModelSpec
