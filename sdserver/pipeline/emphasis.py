"""Emphasis modes: how `(word:1.3)` weights change the text encoder's output (A1111's `emphasis` option).

- "Original" (default): multiply each token's hidden state by its weight, then rescale the whole tensor so
  its mean equals the unweighted mean (A1111 keeps this to avoid artifacts).
- "No norm": multiply only.
- "Ignore": brackets are parsed (so they vanish from the text and BREAK works) but weights are 1.
- "None": no parsing at all; brackets are literal text.
Facts from A1111's `modules/sd_emphasis.py` and `sd_hijack_clip.py`; the code is our own.
"""

from __future__ import annotations

import enum
from typing import Iterable

import torch

from sdserver.errors import InvalidRequest
from sdserver.pipeline.prompt_parser import is_break, parse_attention


class EmphasisMode(enum.StrEnum):
    ORIGINAL = "Original"
    NO_NORM = "No norm"
    IGNORE = "Ignore"
    NONE = "None"


def parse_emphasis_mode(value: str, *, field: str = "emphasis") -> EmphasisMode:
    try:
        return EmphasisMode(value)
    except ValueError:
        allowed = ", ".join(repr(mode.value) for mode in EmphasisMode)
        raise InvalidRequest(f"unknown emphasis mode {value!r}; allowed: {allowed}", field=field) from None


def weights_for_mode(text: str, mode: EmphasisMode | str) -> list[tuple[str, float]]:
    """The `(text, weight)` parts to chunk for `text` under `mode`.

    "Ignore" keeps the parse's parts (the tokenization is per part, so merging them would change tokens)
    and sets every weight to 1, except the BREAK marker.
    """
    mode = EmphasisMode(mode)
    if mode is EmphasisMode.NONE:
        return [(text, 1.0)]
    parts = parse_attention(text)
    if mode is EmphasisMode.IGNORE:
        return [part if is_break(part) else (part[0], 1.0) for part in parts]
    return parts


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: EmphasisMode | str) -> torch.Tensor:
    """Weight the encoder output `z` [B, T, D] by `multipliers` [B, T].

    "Original" restores the mean over the whole tensor, batch included, as A1111: to match its numbers,
    pass the same batch it encodes together (all the texts of one prompt's schedule, one chunk index).
    """
    mode = EmphasisMode(mode)
    if mode in (EmphasisMode.IGNORE, EmphasisMode.NONE):
        return z
    weighted = z * multipliers.to(z.device).unsqueeze(-1)
    if mode is EmphasisMode.NO_NORM:
        return weighted
    return weighted * (z.mean() / weighted.mean())


def emphasis_infotext(texts: Iterable[str], mode: EmphasisMode | str) -> str | None:
    """The infotext `Emphasis` value: the mode's name when it isn't "Original" and a text has brackets."""
    mode = EmphasisMode(mode)
    if mode is not EmphasisMode.ORIGINAL and any("(" in text or "[" in text for text in texts):
        return mode.value
    return None
