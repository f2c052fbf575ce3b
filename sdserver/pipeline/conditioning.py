"""Prompt text → cross-attention conditioning, A1111's way.

Each prompt becomes a schedule of texts (prompt editing, alternation), each text a list of weighted parts
(emphasis) cut into 75-token chunks encoded as 77 tokens each and concatenated along the token axis. Every
distinct text is encoded once per request, not once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdserver.models.sd_model import SDModel
from sdserver.pipeline.chunking import chunk_prompt
from sdserver.pipeline.emphasis import apply_emphasis
from sdserver.pipeline.prompt_parser import parse_attention, prompt_schedule, schedule_index_at, split_and


@dataclass(frozen=True)
class TextConditioning:
    context: torch.Tensor  # [T, D]: 77 tokens per chunk
    pooled: torch.Tensor | None  # [P] from the first chunk, where the family uses it


@dataclass(frozen=True)
class ScheduledConditioning:
    """One prompt part's conditionings with the last sampler step each one is used for."""

    entries: tuple[tuple[int, TextConditioning], ...]
    weight: float = 1.0

    def at(self, step: int) -> TextConditioning:
        return self.entries[schedule_index_at([(end, None) for end, _ in self.entries], step)][1]


@dataclass(frozen=True)
class PromptConditioning:
    """A whole prompt: several weighted parts for composable `AND` prompts, else one."""

    parts: tuple[ScheduledConditioning, ...]


@dataclass(frozen=True)
class ConditioningOptions:
    clip_skip: int = 1
    emphasis: str = "Original"  # "Original", "No norm", "Ignore", "None"
    comma_padding_backtrack: int = 20
    use_old_scheduling: bool = False


@dataclass
class TextEncoderCache:
    """Per-request memo of encoded texts, so equal prompts across a batch (and across batches) encode once."""

    model: SDModel
    options: ConditioningOptions
    encoded: dict[str, TextConditioning] = field(default_factory=dict)

    def encode(self, text: str) -> TextConditioning:
        if text not in self.encoded:
            self.encoded[text] = encode_text(self.model, text, self.options)
        return self.encoded[text]


def weighted_parts(text: str, emphasis: str) -> list[tuple[str, float]]:
    if emphasis == "None":
        return [(text, 1.0)]
    parts = parse_attention(text)
    if emphasis == "Ignore":
        return [(t, -1.0 if w == -1 else 1.0) for t, w in parts]
    return parts


@torch.no_grad()
def encode_text(model: SDModel, text: str, options: ConditioningOptions) -> TextConditioning:
    pad = model.spec.text_encoders[0].pad_token
    chunks = chunk_prompt(
        weighted_parts(text, options.emphasis), model.tokenizer,
        comma_padding_backtrack=options.comma_padding_backtrack, pad_token=pad,
    )
    tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
    multipliers = torch.tensor([c.multipliers for c in chunks], dtype=torch.float32)
    encoding = model.encode_tokens(tokens, options.clip_skip)
    context = apply_emphasis(encoding.context, multipliers.to(encoding.context.device), options.emphasis)
    pooled = None if encoding.pooled is None else encoding.pooled[0]
    return TextConditioning(context.reshape(-1, context.shape[-1]), pooled)


def condition_prompt(
    cache: TextEncoderCache, prompt: str, steps: int, *, allow_and: bool = True, hires_steps: int | None = None
) -> PromptConditioning:
    """`steps` counts denoiser calls the schedule refers to (A1111 doubles it for second-order samplers)."""
    parts = split_and(prompt) if allow_and else [(prompt, 1.0)]
    scheduled = []
    for text, weight in parts:
        schedule = prompt_schedule(
            text, steps, hires_steps=hires_steps, use_old_scheduling=cache.options.use_old_scheduling
        )
        scheduled.append(ScheduledConditioning(tuple((end, cache.encode(t)) for end, t in schedule), weight))
    return PromptConditioning(tuple(scheduled))
