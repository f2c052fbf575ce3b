"""Prompt text → cross-attention conditioning, A1111's way.

Each prompt becomes a schedule of texts (prompt editing, alternation), each text a list of weighted parts
(emphasis) cut into 75-token chunks encoded as 77 tokens each and concatenated along the token axis. Every
distinct prompt schedule is encoded once per request, not once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sdserver.models.sd_model import SDModel
from sdserver.pipeline.chunking import Chunk, EmbeddingLookup, chunk_prompt, empty_chunk
from sdserver.pipeline.emphasis import apply_emphasis, weights_for_mode
from sdserver.pipeline.extra_networks import parse_extra_networks
from sdserver.pipeline.prompt_parser import prompt_schedule, schedule_index_at, split_and, strip_comments

# Builds the token-embedding input of one chunk batch with textual-inversion vectors spliced in.
TokenEmbedder = Callable[[SDModel, torch.Tensor, Sequence[Chunk]], Sequence[torch.Tensor | None] | None]


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
    """Per-request memo of encoded prompt schedules, so equal prompts across a batch (and across batches)
    encode once."""

    model: SDModel
    options: ConditioningOptions
    embeddings: EmbeddingLookup | None = None
    token_embeds: TokenEmbedder | None = None
    encoded: dict[tuple[str, ...], tuple[TextConditioning, ...]] = field(default_factory=dict)
    used_embeddings: list[str] = field(default_factory=list)  # in first-use order, for "TI hashes"

    def encode(self, texts: tuple[str, ...]) -> tuple[TextConditioning, ...]:
        if texts not in self.encoded:
            self.encoded[texts] = encode_texts(
                self.model, texts, self.options, self.embeddings, self.token_embeds, self.used_embeddings
            )
        return self.encoded[texts]


@torch.no_grad()
def encode_texts(
    model: SDModel,
    texts: tuple[str, ...],
    options: ConditioningOptions,
    embeddings: EmbeddingLookup | None = None,
    token_embeds: TokenEmbedder | None = None,
    used_embeddings: list[str] | None = None,
) -> tuple[TextConditioning, ...]:
    """Encode one prompt's schedule texts together, as A1111 does: chunk i of every text is one batch, shorter
    texts are padded with empty chunks, and "Original" emphasis restores the mean over that batch."""
    pad = model.spec.text_encoders[0].pad_token
    chunked = [
        chunk_prompt(
            weights_for_mode(text, options.emphasis), model.tokenizer, embeddings=embeddings,
            comma_padding_backtrack=options.comma_padding_backtrack, pad_token=pad,
        )
        for text in texts
    ]
    if used_embeddings is not None:
        for slot in (slot for chunks in chunked for chunk in chunks for slot in chunk.embeddings):
            if slot.name not in used_embeddings:
                used_embeddings.append(slot.name)
    count = max(len(c) for c in chunked)
    for chunks in chunked:
        chunks.extend(empty_chunk(model.tokenizer, pad_token=pad) for _ in range(count - len(chunks)))
    contexts, pooled = [], None
    for i in range(count):
        batch = [chunks[i] for chunks in chunked]
        tokens = torch.tensor([c.tokens for c in batch], dtype=torch.long)
        multipliers = torch.tensor([c.multipliers for c in batch], dtype=torch.float32)
        inputs = None if token_embeds is None else token_embeds(model, tokens, batch)
        encoding = model.encode_tokens(tokens, options.clip_skip, token_embeds=inputs)
        contexts.append(apply_emphasis(encoding.context, multipliers.to(encoding.context.device), options.emphasis))
        if i == 0:
            pooled = encoding.pooled
    context = torch.cat(contexts, dim=1)
    return tuple(TextConditioning(context[j], None if pooled is None else pooled[j]) for j in range(len(texts)))


def condition_prompt(
    cache: TextEncoderCache, prompt: str, steps: int, *, allow_and: bool = True, hires_steps: int | None = None
) -> PromptConditioning:
    """`steps` counts denoiser calls the schedule refers to (A1111 doubles it for second-order samplers).
    Comments and extra-network tags (`<lora:...>`) are removed first: they are instructions, not text."""
    prompt = parse_extra_networks(strip_comments(prompt))[0]
    parts = split_and(prompt) if allow_and else [(prompt, 1.0)]
    scheduled = []
    for text, weight in parts:
        schedule = prompt_schedule(
            text, steps, hires_steps=hires_steps, use_old_scheduling=cache.options.use_old_scheduling
        )
        encoded = cache.encode(tuple(t for _, t in schedule))
        scheduled.append(ScheduledConditioning(tuple((end, e) for (end, _), e in zip(schedule, encoded)), weight))
    return PromptConditioning(tuple(scheduled))


def map_text_conditioning(
    conditioning: PromptConditioning, fn: Callable[[TextConditioning], TextConditioning]
) -> PromptConditioning:
    """`conditioning` with `fn` applied to every scheduled entry of every part (schedules and weights kept)."""
    return PromptConditioning(tuple(
        ScheduledConditioning(tuple((end, fn(entry)) for end, entry in part.entries), part.weight)
        for part in conditioning.parts
    ))


def is_empty_prompt(prompt: str) -> bool:
    """Nothing left once comments and extra-network tags are taken out (A1111's test is `x == ''` on that)."""
    return parse_extra_networks(strip_comments(prompt))[0] == ""


def zeroed(entry: TextConditioning) -> TextConditioning:
    """The text embeddings replaced by zeros: sgm's `force_zero_embeddings`, which A1111 uses for SDXL-style
    models when every negative prompt of the batch is empty."""
    pooled = None if entry.pooled is None else torch.zeros_like(entry.pooled)
    return TextConditioning(torch.zeros_like(entry.context), pooled)
