"""Extra-network tags in prompts: `<lora:name:0.8>`, `<hypernet:name:1>`, any `<kind:arg1:arg2...>`.

The tags are taken out of the text before it is encoded (the infotext keeps the original prompt). A1111
reads them only from the positive prompt, and only the first prompt of a batch decides which networks are
active (`parse_extra_networks_batch`). Comments are stripped before this step. Facts from A1111's
`modules/extra_networks.py` and `extensions-builtin/Lora/extra_networks_lora.py`; the code is our own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from sdserver.errors import InvalidRequest

_TAG = re.compile(r"<(\w+):([^>]+)>")
# A1111 registers "lyco" (the old LyCORIS extension's tag) as another name for its LoRA network.
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One tag: `<kind:items[0]:items[1]...>`. An item `key=value` is a named argument, others positional."""

    kind: str
    items: tuple[str, ...]

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(item for item in self.items if _named_pair(item) is None)

    @property
    def named(self) -> dict[str, str]:
        pairs = (_named_pair(item) for item in self.items)
        return dict(pair for pair in pairs if pair is not None)

    @property
    def tag(self) -> str:
        return f"<{self.kind}:{':'.join(self.items)}>"


def _named_pair(item: str) -> tuple[str, str] | None:
    # As A1111: exactly one "=" makes a named argument; "a=b=c" stays positional.
    parts = item.split("=", 2)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove every `<kind:args>` tag from `prompt`; return the remaining text and the calls in order."""
    calls: list[ExtraNetworkCall] = []

    def take(match: re.Match[str]) -> str:
        calls.append(ExtraNetworkCall(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _TAG.sub(take, prompt), calls


def parse_extra_networks_batch(prompts: Sequence[str]) -> tuple[list[str], list[ExtraNetworkCall]]:
    """Strip tags from every prompt of a batch; the calls are the first prompt's, as in A1111."""
    texts: list[str] = []
    first_calls: list[ExtraNetworkCall] | None = None
    for prompt in prompts:
        text, calls = parse_extra_networks(prompt)
        texts.append(text)
        if first_calls is None:
            first_calls = calls
    return texts, first_calls or []


@dataclass(frozen=True)
class LoraCall:
    name: str  # file basename without extension, or the LoRA's alias
    te_weight: float
    unet_weight: float
    dyn: int | None = None  # dynamic rank limit (`dyn=`), None for the full rank


def lora_calls(
    calls: Iterable[ExtraNetworkCall], default_multiplier: float = 1.0, *, field: str = "prompt"
) -> list[LoraCall]:
    """The LoRA requests among `calls`: `<lora:NAME[:te[:unet[:dyn]]]>`, or named `te=`, `unet=`, `dyn=`.

    A missing te weight is `default_multiplier`; unet defaults to te. Like A1111 the order is by kind
    first seen (`lora` before `lyco` if a lora tag came first), then by position. A bad number raises
    InvalidRequest naming `field`.
    """
    by_kind: dict[str, list[ExtraNetworkCall]] = {}
    for call in calls:
        if call.kind in LORA_KINDS:
            by_kind.setdefault(call.kind, []).append(call)
    return [_lora_call(call, default_multiplier, field) for kind_calls in by_kind.values() for call in kind_calls]


def _lora_call(call: ExtraNetworkCall, default_multiplier: float, field: str) -> LoraCall:
    positional, named = call.positional, call.named
    if not positional or not positional[0]:
        raise InvalidRequest(f"{call.tag}: a LoRA tag needs a name", field=field)
    te = _number(call, named["te"] if "te" in named else _at(positional, 1), default_multiplier, field)
    unet = _number(call, named["unet"] if "unet" in named else _at(positional, 2), te, field)
    dyn_text = named["dyn"] if "dyn" in named else _at(positional, 3)
    dyn = None
    if dyn_text is not None:
        try:
            dyn = int(dyn_text)
        except ValueError:
            raise InvalidRequest(f"{call.tag}: dyn must be an integer, got {dyn_text!r}", field=field) from None
    return LoraCall(positional[0], te, unet, dyn)


def _at(items: tuple[str, ...], index: int) -> str | None:
    return items[index] if len(items) > index else None


def _number(call: ExtraNetworkCall, text: str | None, default: float, field: str) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"{call.tag}: {text!r} is not a number", field=field) from None
    if not math.isfinite(value):
        raise InvalidRequest(f"{call.tag}: the weight must be finite, got {text!r}", field=field)
    return value
