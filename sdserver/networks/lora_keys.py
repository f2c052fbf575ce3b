"""Which of our model's modules a LoRA-family key names.

LoRA files name their target modules in several spellings:

- kohya (`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_mlp_fc1`): the
  diffusers module path with dots turned into underscores;
- A1111/LDM-native (`lora_unet_input_blocks_1_1_proj_in`, `diffusion_model_...`, `transformer_text_model_...`):
  the original single-file module path, underscored; SDXL kohya files use this for the UNet;
- diffusers/PEFT (`unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`, `text_encoder.text_model...`).

Underscores are ambiguous (`transformer_blocks` vs `transformer.blocks`), so like A1111 we don't parse names:
we underscore every module path of the loaded model under each spelling and look keys up in that table.
Our UNet has the LDM layout, so its diffusers names come from a block map derived from the `UNetConfig`
(A1111 hard-codes the SD 1.x numbering `1 + 3*block + index`; deriving it keeps SDXL's layout an addition).
Our text encoders have Hugging Face names minus `text_model.`, the names kohya uses.

Per-family facts (the text-encoder prefixes) live in `FAMILY_KEYS`; a family missing there has no LoRA support.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from sdserver.errors import UnsupportedFeature
from sdserver.models.family_base import UNET, text_encoder_component
from sdserver.models.nn.config import UNetConfig

# diffusers ResnetBlock2D names ↔ LDM ResBlock names (norms included: full-diff networks train them).
_RESNET_SUFFIXES: Mapping[str, str] = MappingProxyType(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
)


@dataclass(frozen=True)
class Target:
    """A module of ours a network module patches: `component` is "unet", "text_encoder", "text_encoder_2"...;
    `module` its path inside that component (its weight is `module + ".weight"`)."""

    component: str
    module: str

    @property
    def param(self) -> str:
        return self.module + ".weight"

    @property
    def is_text_encoder(self) -> bool:
        return self.component != UNET


@dataclass(frozen=True)
class FamilyKeys:
    """How one family's LoRA files name text-encoder modules.

    `te_prefixes[i]` are the underscored prefixes put before encoder i's (underscored) module paths;
    `peft_prefixes` rewrite diffusers/PEFT dotted roots into kohya spelling before underscoring.
    """

    te_prefixes: tuple[tuple[str, ...], ...]
    peft_prefixes: tuple[tuple[str, str], ...]


# SD 1.x/2.x: one encoder. Kohya writes `lora_te_`; A1111 also accepts SDXL's `lora_te1_` and its own
# `transformer_text_model_` names on SD 1.x. SD 2.x's OpenCLIP encoder is converted to the HF layout on load,
# which is the layout kohya names it by, so the same prefixes serve it.
_SINGLE_TE = FamilyKeys(
    te_prefixes=(("lora_te_text_model_", "lora_te1_text_model_", "transformer_text_model_"),),
    peft_prefixes=(("unet.", "lora_unet_"), ("text_encoder.", "lora_te_")),
)

FAMILY_KEYS: Mapping[str, FamilyKeys] = MappingProxyType(
    {
        "sd1": _SINGLE_TE,
        "sd2": _SINGLE_TE,
        "sdxl": FamilyKeys(
            te_prefixes=(("lora_te1_text_model_", "0_transformer_text_model_"), ("lora_te2_text_model_",)),
            # Longest first: "text_encoder_2." must win over "text_encoder.".
            peft_prefixes=(("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_")),
        ),
    }
)


def unet_block_map(cfg: UNetConfig) -> dict[str, tuple[str, str]]:
    """LDM module prefix → (diffusers prefix, kind) for every UNet block; kind is "resnet", "attention",
    "downsample", "upsample" or "plain" (a single layer whose path maps whole)."""
    blocks: dict[str, tuple[str, str]] = {
        "input_blocks.0.0": ("conv_in", "plain"),
        "time_embed.0": ("time_embedding.linear_1", "plain"),
        "time_embed.2": ("time_embedding.linear_2", "plain"),
        "out.0": ("conv_norm_out", "plain"),
        "out.2": ("conv_out", "plain"),
    }
    if cfg.adm_in_channels:
        blocks["label_emb.0.0"] = ("add_embedding.linear_1", "plain")
        blocks["label_emb.0.2"] = ("add_embedding.linear_2", "plain")
    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if cfg.transformer_depth[level] > 0:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
            index += 1
        if level != levels - 1:
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.downsamplers.0", "downsample")
            index += 1
    blocks["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    if cfg.transformer_depth_middle > 0:
        blocks["middle_block.1"] = ("mid_block.attentions.0", "attention")
        blocks["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    else:
        blocks["middle_block.1"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        has_attention = cfg.transformer_depth[level] > 0
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", "resnet")
            if has_attention:
                blocks[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", "attention")
            if level and j == cfg.num_res_blocks:
                slot = 2 if has_attention else 1
                blocks[f"output_blocks.{index}.{slot}"] = (f"up_blocks.{up}.upsamplers.0", "upsample")
            index += 1
    return blocks


def diffusers_unet_name(module: str, blocks: Mapping[str, tuple[str, str]]) -> str | None:
    """The diffusers path of one of our (LDM-named) UNet modules, or None where diffusers has no such module."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix not in blocks:
            continue
        target, kind = blocks[prefix]
        rest = ".".join(parts[cut:])
        if kind == "plain":
            return target if not rest else None
        if kind == "resnet":
            suffix = _RESNET_SUFFIXES.get(rest)
            return f"{target}.{suffix}" if suffix else None
        if kind == "downsample":
            return f"{target}.conv" if rest == "op" else None
        if kind == "upsample":
            return f"{target}.conv" if rest == "conv" else None
        # Attention blocks (SpatialTransformer ↔ Transformer2DModel) share every inner name.
        return f"{target}.{rest}" if rest else None
    return None


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _weighted_modules(module: nn.Module) -> list[str]:
    return [name for name, sub in module.named_modules() if name and isinstance(getattr(sub, "weight", None), nn.Parameter)]


def family_keys(family: str) -> FamilyKeys:
    keys = FAMILY_KEYS.get(family)
    if keys is None:
        raise UnsupportedFeature(f"LoRA networks aren't supported for the {family} model family yet", field="prompt")
    return keys


@dataclass(frozen=True)
class TargetTable:
    """Underscored module names (every spelling) → our target, for one model structure."""

    family: str
    targets: Mapping[str, Target]

    def resolve(self, module_key: str) -> Target | None:
        """The target of a LoRA module key in any supported spelling (dotted PEFT keys included)."""
        hit = self.targets.get(module_key)
        if hit is not None:
            return hit
        return self.targets.get(normalize_module_key(module_key, family_keys(self.family)))


def build_target_table(model: nn.Module) -> TargetTable:
    """The lookup table for a loaded `SDModel` (anything with `.family`, `.unet`, `.text_encoders`)."""
    family: str = model.family  # type: ignore[assignment]
    keys = family_keys(family)
    targets: dict[str, Target] = {}

    def add(alias: str, target: Target) -> None:
        # Spellings never collide for released layouts; keeping the first keeps the table deterministic anyway.
        targets.setdefault(alias, target)

    unet = model.unet  # type: ignore[attr-defined]
    blocks = unet_block_map(unet.config)
    for name in _weighted_modules(unet):
        target = Target(UNET, name)
        flat = _underscored(name)
        add("lora_unet_" + flat, target)
        add("diffusion_model_" + flat, target)
        diffusers = diffusers_unet_name(name, blocks)
        if diffusers is not None:
            add("lora_unet_" + _underscored(diffusers), target)
    encoders = list(model.text_encoders)  # type: ignore[attr-defined]
    for index, (encoder, prefixes) in enumerate(zip(encoders, keys.te_prefixes)):
        component = text_encoder_component(index)
        for name in _weighted_modules(encoder):
            flat = _underscored(name)
            for prefix in prefixes:
                add(prefix + flat, Target(component, name))
    return TargetTable(family, MappingProxyType(targets))


# Old diffusers attention-processor LoRAs: `...attn1.processor.to_q_lora` is the LoRA of `...attn1.to_q`.
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# diffusers' LoRA wrappers: `...q_proj.lora_linear_layer` (text encoder), `...to_q.lora` (LoRACompatibleLinear).
_WRAPPER = re.compile(r"\.(lora_linear_layer|lora)$")


def normalize_module_key(key: str, keys: FamilyKeys) -> str:
    """A dotted diffusers/PEFT module key in kohya's underscored spelling (unchanged if not dotted)."""
    match = _PROCESSOR.search(key)
    if match:
        layer = match.group(1)
        key = key[: match.start()] + "." + ("to_out.0" if layer == "to_out" else layer)
    key = _WRAPPER.sub("", key)
    for dotted, kohya in keys.peft_prefixes:
        if key.startswith(dotted):
            key = kohya + key[len(dotted) :]
            break
    return _underscored(key)


# Tensor names inside one network module, as the LoRA/LyCORIS formats write them. Dotted ones first so a
# PEFT key splits at the right dot.
_PART_NAMES = (
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "up.weight", "down.weight",
)


def split_key(key: str) -> tuple[str, str]:
    """(module key, tensor part) of a network file's tensor name.

    kohya keys have one dot-free module name (`lora_unet_x.lora_down.weight` → `lora_unet_x`,
    `lora_down.weight`); PEFT keys are dotted paths ending in a known part (`unet.a.b.lora_A.weight`)."""
    for part in _PART_NAMES:
        if key.endswith("." + part):
            module = key[: -len(part) - 1]
            if "." in module:
                return module, _canonical_part(part)
    module, _, part = key.partition(".")
    if "." in part and module in ("unet", "text_encoder", "text_encoder_2"):
        module_path, _, last = key.rpartition(".")
        return module_path, last
    return module, _canonical_part(part)


def _canonical_part(part: str) -> str:
    return {
        "lora_A.weight": "lora_down.weight",
        "lora_B.weight": "lora_up.weight",
        "down.weight": "lora_down.weight",
        "up.weight": "lora_up.weight",
    }.get(part, part)
