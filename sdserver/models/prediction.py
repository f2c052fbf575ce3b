"""What a checkpoint's UNet predicts: noise ("eps") or velocity ("v").

The architecture doesn't tell (SD 2.x 512-base and 768-v have identical shapes), so the answer comes from,
in order: the user's override; the file's own declaration (`sdserver.config` or `modelspec.prediction_type`
metadata, or a `v_pred` marker tensor); a `.yaml` beside the checkpoint (`parameterization: "v"`); and only for
families whose variants can't be told apart, a logged heuristic on the weights. Every answer records its source.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdserver.errors import ModelLoadError
from sdserver.models import config_metadata as cm
from sdserver.models.family_base import FamilyMatch

log = logging.getLogger(__name__)

_YAML_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?([A-Za-z_]+)[\"']?\s*$", re.MULTILINE)
_MODELSPEC_KEY = "modelspec.prediction_type"
_V_PRED_MARKER = "v_pred"  # an empty tensor some tools add to v-prediction checkpoints
ZTSNR_MARKER = "ztsnr"  # likewise, for models trained with a zero-terminal-SNR schedule


def normalise(value: str, source: str) -> str:
    try:
        return cm.PREDICTION_TYPES[value.strip().lower()]
    except KeyError:
        raise ModelLoadError(
            f"prediction type '{value}' from {source} is not one of {sorted(cm.PREDICTION_TYPES)}",
            field="prediction_type",
        ) from None


def declared_prediction(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """(prediction type, source) when the file itself says, else None."""
    doc = cm.parse_config_metadata(dict(metadata))
    if doc.get("prediction_type") is not None:
        return cm.prediction_type_of(doc, "eps"), "metadata"
    if _MODELSPEC_KEY in metadata:
        return normalise(metadata[_MODELSPEC_KEY], _MODELSPEC_KEY), "metadata"
    if _V_PRED_MARKER in shapes:
        return "v", "marker"
    return None


def yaml_prediction(config: Path | None) -> str | None:
    """The `parameterization` of an LDM config file beside the checkpoint, if it names one."""
    if config is None:
        return None
    try:
        text = Path(config).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = _YAML_PARAMETERIZATION.search(text)
    return normalise(found.group(1), str(config)) if found else None


def resolve_prediction(
    match: FamilyMatch,
    state_dict: Mapping[str, torch.Tensor],
    config: Path | None = None,
    override: str | None = None,
) -> FamilyMatch:
    """`match` with its spec's prediction type settled from the sources above."""
    spec = match.spec
    if override is not None:
        chosen = (normalise(override, "the override"), "override")
    elif spec.prediction_source != "default":
        return match
    elif (from_yaml := yaml_prediction(config)) is not None:
        chosen = (from_yaml, "yaml")
    elif (guess := match.family.guess_prediction(state_dict)) is not None:
        chosen = (guess, "heuristic")
        log.warning(
            "%s checkpoint doesn't say whether it predicts eps or v; guessed '%s' from its weights. Put a .yaml "
            "with 'parameterization: \"v\"' beside it (or override the prediction type) if that is wrong.",
            match.family.name,
            guess,
        )
    else:
        return match
    kind, source = chosen
    size = spec.default_size
    if size == match.family.native_size(spec.prediction_type):  # not set by metadata: follow the prediction type
        size = match.family.native_size(kind)
    changed = dataclasses.replace(spec, prediction_type=kind, prediction_source=source, default_size=size)
    return FamilyMatch(match.family, changed)
