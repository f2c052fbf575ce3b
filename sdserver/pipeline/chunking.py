"""A1111's 75-token chunking of a weighted prompt (no torch).

CLIP reads 77 positions: BOS, 75 prompt tokens, EOS. A longer prompt is cut into chunks of 75 that are
encoded one by one and concatenated along the token axis (77·k tokens). Rules, from A1111's
`modules/sd_hijack_clip.py` (`tokenize_line`; read for facts, the code is our own):

- each `(text, weight)` part is tokenized on its own; every token carries its part's weight;
- the BREAK marker ends the current chunk and pads it (even an empty one);
- when a chunk is full and its last comma is at most `comma_padding_backtrack` tokens back, the tokens after
  that comma move to the next chunk (0 turns this off);
- a textual-inversion embedding is never split: if its vectors don't fit, the chunk is padded and the
  embedding starts the next one. It fills `n_vectors` positions holding a placeholder token; the conditioning
  code splices the vectors in at `EmbeddingSlot.offset`;
- an empty prompt gives one chunk; padding is EOS (SD1/SDXL CLIP-L) or, with `pad_token` (OpenCLIP: 0),
  `pad_token` after the first EOS. Multipliers are 1.0 at BOS, EOS and padding.

One deliberate difference: when the comma rule moves tokens that include an embedding, A1111 leaves the
embedding's splice point behind in the old chunk (the vectors land on its padding); here it moves along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from sdserver.errors import InvalidRequest
from sdserver.pipeline.prompt_parser import is_break

CHUNK_LENGTH = 75  # prompt tokens per chunk: CLIP's 77 positions less BOS and EOS
# What an embedding's positions hold before its vectors are spliced in (A1111 uses token 0 too).
EMBEDDING_PLACEHOLDER = 0


class TokenizerLike(Protocol):
    """What chunking needs from a tokenizer. `encode` returns ids without BOS/EOS."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def comma_id(self) -> int: ...  # the id of "," (267 in CLIP's BPE)

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class EmbeddingMatch:
    name: str
    n_tokens: int  # prompt tokens the embedding's name spans
    n_vectors: int  # positions its vectors occupy


class EmbeddingLookup(Protocol):
    def find_at(self, tokens: Sequence[int], offset: int) -> EmbeddingMatch | None:
        """The embedding whose name's tokens start at `tokens[offset]`, if any (longest name first)."""
        ...


@dataclass(frozen=True)
class EmbeddingTable:
    """An EmbeddingLookup over known names: `by_first_token[id]` lists (name tokens, name, n_vectors),
    longest first, as A1111's embedding database does."""

    by_first_token: Mapping[int, tuple[tuple[tuple[int, ...], str, int], ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, embeddings: Mapping[str, int], tokenizer: TokenizerLike) -> EmbeddingTable:
        """`embeddings` maps each embedding's name (as written in prompts) to its vector count."""
        grouped: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
        for name, n_vectors in embeddings.items():
            ids = tuple(tokenizer.encode(name))
            if ids:
                grouped.setdefault(ids[0], []).append((ids, name, n_vectors))
        return cls({first: tuple(sorted(entries, key=lambda e: -len(e[0]))) for first, entries in grouped.items()})

    def find_at(self, tokens: Sequence[int], offset: int) -> EmbeddingMatch | None:
        for ids, name, n_vectors in self.by_first_token.get(tokens[offset], ()):
            if tuple(tokens[offset : offset + len(ids)]) == ids:
                return EmbeddingMatch(name, len(ids), n_vectors)
        return None


@dataclass(frozen=True)
class EmbeddingSlot:
    name: str
    offset: int  # index in Chunk.tokens (BOS is 0) of the embedding's first vector
    n_vectors: int


@dataclass(frozen=True)
class Chunk:
    tokens: tuple[int, ...]  # 77 ids: BOS, 75, EOS
    multipliers: tuple[float, ...]  # 77 emphasis weights
    embeddings: tuple[EmbeddingSlot, ...] = ()
    # What this chunk adds to A1111's token counter: 75, or the used length for the prompt's last chunk.
    token_count: int = 0


def prompt_token_count(chunks: Iterable[Chunk]) -> int:
    """A1111's count of a prompt's tokens (the UI's `n/75`)."""
    return sum(chunk.token_count for chunk in chunks)


def empty_chunk(tokenizer: TokenizerLike, *, pad_token: int | None = None) -> Chunk:
    """The chunk of an empty prompt: pads a shorter prompt's chunk list when prompts of a batch differ."""
    return _finish([], [], [], tokenizer, pad_token, token_count=0)


def chunk_prompt(
    weighted_parts: Sequence[tuple[str, float]],
    tokenizer: TokenizerLike,
    *,
    comma_padding_backtrack: int = 20,
    embeddings: EmbeddingLookup | None = None,
    pad_token: int | None = None,
    field: str = "prompt",
) -> list[Chunk]:
    """Cut `weighted_parts` (from parse_attention, or [(text, 1.0)] with emphasis "None") into chunks."""
    chunks: list[Chunk] = []
    body: list[int] = []
    weights: list[float] = []
    slots: list[tuple[str, int, int]] = []  # (name, offset in body, n_vectors)
    last_comma = -1

    def flush(*, is_last: bool = False) -> None:
        nonlocal body, weights, slots, last_comma
        count = len(body) if is_last else CHUNK_LENGTH
        chunks.append(_finish(body, weights, slots, tokenizer, pad_token, token_count=count))
        body, weights, slots, last_comma = [], [], [], -1

    for part in weighted_parts:
        if is_break(part):
            flush()
            continue
        text, weight = part
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == tokenizer.comma_id:
                last_comma = len(body)
            elif (
                comma_padding_backtrack != 0
                and len(body) == CHUNK_LENGTH
                and last_comma != -1
                and len(body) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                moved = (body[cut:], weights[cut:], [(n, o - cut, v) for n, o, v in slots if o >= cut])
                body, weights, slots = body[:cut], weights[:cut], [s for s in slots if s[1] < cut]
                flush()
                body, weights, slots = moved
            if len(body) == CHUNK_LENGTH:
                flush()

            match = embeddings.find_at(tokens, position) if embeddings is not None else None
            if match is None:
                body.append(token)
                weights.append(weight)
                position += 1
                continue
            if match.n_vectors > CHUNK_LENGTH:
                raise InvalidRequest(
                    f"embedding {match.name!r} has {match.n_vectors} vectors; a chunk holds {CHUNK_LENGTH}",
                    field=field,
                )
            if len(body) + match.n_vectors > CHUNK_LENGTH:
                flush()
            slots.append((match.name, len(body), match.n_vectors))
            body.extend([EMBEDDING_PLACEHOLDER] * match.n_vectors)
            weights.extend([weight] * match.n_vectors)
            position += match.n_tokens

    if body or not chunks:
        flush(is_last=True)
    return chunks


def _finish(
    body: list[int],
    weights: list[float],
    slots: list[tuple[str, int, int]],
    tokenizer: TokenizerLike,
    pad_token: int | None,
    *,
    token_count: int,
) -> Chunk:
    fill = CHUNK_LENGTH - len(body)
    tokens = [tokenizer.bos_id, *body] + [tokenizer.eos_id] * (fill + 1)
    if pad_token is not None:
        # OpenCLIP was trained with 0-padding after the end token.
        first_eos = tokens.index(tokenizer.eos_id)
        tokens[first_eos + 1 :] = [pad_token] * (len(tokens) - first_eos - 1)
    multipliers = [1.0, *weights] + [1.0] * (fill + 1)
    return Chunk(
        tokens=tuple(tokens),
        multipliers=tuple(multipliers),
        embeddings=tuple(EmbeddingSlot(name, offset + 1, n) for name, offset, n in slots),
        token_count=token_count,
    )
