"""One checkpoint file → an `SDModel`: read shapes, detect the family, validate, read tensors, build.

Validation reads no tensor data, so a file with a wrong family or a bad tensor is refused before gigabytes are
read; the prediction type is settled once the tensors are in (a heuristic may need one of them).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from sdserver.errors import ModelLoadError
from sdserver.models.build import build_model, check_component, component_modules
from sdserver.models.families import FamilyMatch, detect
from sdserver.models.files import load_state_dict, read_metadata, read_shapes
from sdserver.models.prediction import resolve_prediction
from sdserver.models.sd_model import SDModel
from sdserver.models.tokenizer import CLIPTokenizer


def validate_file(path: Path) -> FamilyMatch:
    """Detect the family of a checkpoint file and check every tensor's key and shape, reading no data."""
    shapes = read_shapes(path)
    match = detect(shapes, read_metadata(path))
    parts = match.family.split(shapes)
    problems: list[str] = []
    for name, module in component_modules(match.spec).items():
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        shapes_of = dataclasses.replace(
            parts[name], entries=match.family.convert_shapes(name, dict(parts[name]))
        )
        problems += check_component(name, expected, shapes_of)
    if problems:
        raise ModelLoadError(f"checkpoint doesn't fit the {match.family.name} architecture: " + "; ".join(problems))
    return match


def load_checkpoint(
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    tokenizer: CLIPTokenizer | None = None,
    *,
    config: Path | None = None,
    prediction_type: str | None = None,
    vae_dtype: torch.dtype | None = None,
) -> SDModel:
    """Read, detect, validate and build one checkpoint file. `config` is an LDM .yaml beside it (read for its
    `parameterization`); `prediction_type` ("eps"/"v") overrides whatever the file says; `vae_dtype` keeps
    the VAE in its own dtype."""
    match = validate_file(path)
    state_dict = load_state_dict(path, device="cpu")
    match = resolve_prediction(match, state_dict, config, prediction_type)
    return build_model(state_dict, match, dtype, torch.device(device), tokenizer, vae_dtype=vae_dtype)


def free_memory() -> None:
    """Collect garbage and hand cached accelerator memory back, after models are dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
