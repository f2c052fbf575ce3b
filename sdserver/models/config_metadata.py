"""The `sdserver.config` safetensors metadata entry: component configs a checkpoint carries with it.

Attention head counts (and a model's native size and prediction type) can't be read from tensor shapes, so a
checkpoint may record them: `{"unet": {...}, "vae": {...}, "text_encoder": {...}, "prediction_type": "eps",
"default_size": [w, h]}`, each component a dict of its config dataclass's fields (tuples as lists). Fields left
out keep the values derived from the shapes. Families with two text encoders (SDXL) read a list under
"text_encoders" instead of "text_encoder".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from sdserver.errors import ModelLoadError
from sdserver.models.nn.config import TextEncoderConfig, UNetConfig, VAEConfig

METADATA_KEY = "sdserver.config"
PREDICTION_TYPES: Mapping[str, str] = MappingProxyType(
    {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}
)

C = TypeVar("C", UNetConfig, VAEConfig, TextEncoderConfig)


def encode_config_metadata(
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text_encoder: TextEncoderConfig | None = None,
    *,
    text_encoders: tuple[TextEncoderConfig, ...] | None = None,
    prediction_type: str | None = None,
    default_size: tuple[int, int] | None = None,
) -> dict[str, str]:
    """The metadata entry recording these configs, for `save_checkpoint(..., metadata=...)`."""
    doc: dict[str, Any] = {}
    for key, cfg in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if cfg is not None:
            doc[key] = dataclasses.asdict(cfg)
    if text_encoders is not None:
        doc["text_encoders"] = [dataclasses.asdict(cfg) for cfg in text_encoders]
    if prediction_type is not None:
        doc["prediction_type"] = prediction_type
    if default_size is not None:
        doc["default_size"] = list(default_size)
    return {METADATA_KEY: json.dumps(doc)}


def parse_config_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The decoded entry ({} when absent); raises ModelLoadError naming a malformed one."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ModelLoadError(f"metadata '{METADATA_KEY}' is not valid JSON: {exc}", field=METADATA_KEY) from exc
    if not isinstance(doc, dict):
        raise ModelLoadError(f"metadata '{METADATA_KEY}' must be a JSON object", field=METADATA_KEY)
    return doc


def apply_overrides(cfg: C, overrides: Any, section: str) -> C:
    """`cfg` with the fields named in `overrides` replaced (lists become tuples)."""
    if overrides is None:
        return cfg
    if not isinstance(overrides, dict):
        raise ModelLoadError(f"metadata '{METADATA_KEY}.{section}' must be an object", field=METADATA_KEY)
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelLoadError(
            f"metadata '{METADATA_KEY}.{section}' has unknown fields {unknown}; allowed: {sorted(known)}",
            field=METADATA_KEY,
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def prediction_type_of(doc: dict[str, Any], default: str) -> str:
    value = doc.get("prediction_type")
    if value is None:
        return default
    if value not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"metadata prediction_type '{value}' is not one of {sorted(PREDICTION_TYPES)}", field=METADATA_KEY
        )
    return PREDICTION_TYPES[value]


def default_size_of(doc: dict[str, Any], default: tuple[int, int]) -> tuple[int, int]:
    value = doc.get("default_size")
    if value is None:
        return default
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (value[0], value[1])
    raise ModelLoadError(f"metadata default_size {value!r} must be [width, height]", field=METADATA_KEY)
