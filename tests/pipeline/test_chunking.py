"""75-token chunking against hand-worked token lists.

The fake tokenizer maps "tN" to id 1000+N, "," to 267 (CLIP's comma) and a few named words to fixed ids,
so every expected list below can be written out by hand.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdserver.errors import InvalidRequest
from sdserver.pipeline.chunking import (
    CHUNK_LENGTH,
    EMBEDDING_PLACEHOLDER,
    Chunk,
    EmbeddingSlot,
    EmbeddingTable,
    chunk_prompt,
    empty_chunk,
    prompt_token_count,
)
from sdserver.pipeline.prompt_parser import parse_attention

BOS, EOS, COMMA = 49406, 49407, 267
NAMED = {"my": 2001, "emb": 2002, "big": 2003}


class FakeTokenizer:
    bos_id = BOS
    eos_id = EOS
    comma_id = COMMA

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r"\w+|,", text):
            if word == ",":
                ids.append(COMMA)
            elif word in NAMED:
                ids.append(NAMED[word])
            else:
                ids.append(1000 + int(word[1:]))
        return ids


TOK = FakeTokenizer()


def words(start: int, stop: int) -> str:
    return " ".join(f"t{i}" for i in range(start, stop))


def ids(start: int, stop: int) -> list[int]:
    return [1000 + i for i in range(start, stop)]


def padded(body: list[int], pad: int = EOS) -> list[int]:
    """BOS + body + EOS, padded to 77 with `pad` after the first EOS."""
    return [BOS, *body, EOS] + [pad] * (CHUNK_LENGTH - len(body))


def flat(body_weights: list[float]) -> list[float]:
    return [1.0, *body_weights] + [1.0] * (CHUNK_LENGTH + 1 - len(body_weights))


def test_empty_prompt_is_one_padded_chunk() -> None:
    [chunk] = chunk_prompt(parse_attention(""), TOK)
    assert list(chunk.tokens) == [BOS] + [EOS] * 76
    assert list(chunk.multipliers) == [1.0] * 77
    assert chunk.token_count == 0
    assert chunk == empty_chunk(TOK)


def test_short_prompt_carries_part_weights() -> None:
    [chunk] = chunk_prompt([("t1 t2", 1.0), ("t3", 1.1)], TOK)
    assert list(chunk.tokens) == padded([1001, 1002, 1003])
    assert list(chunk.multipliers) == flat([1.0, 1.0, 1.1])
    assert chunk.token_count == 3


def test_exactly_75_tokens_fit_in_one_chunk_and_76_need_two() -> None:
    [one] = chunk_prompt([(words(0, 75), 1.0)], TOK)
    assert list(one.tokens) == [BOS, *ids(0, 75), EOS]

    first, second = chunk_prompt([(words(0, 76), 1.0)], TOK)
    assert list(first.tokens) == [BOS, *ids(0, 75), EOS]
    assert list(second.tokens) == padded(ids(75, 76))
    assert prompt_token_count([first, second]) == 76


def test_break_ends_the_chunk_and_pads_it() -> None:
    chunks = chunk_prompt(parse_attention("t1 BREAK t2"), TOK)
    assert [list(c.tokens) for c in chunks] == [padded([1001]), padded([1002])]
    assert prompt_token_count(chunks) == 75 + 1


def test_break_first_gives_an_empty_first_chunk_and_break_last_adds_none() -> None:
    leading = chunk_prompt(parse_attention("BREAK t2"), TOK)
    assert [list(c.tokens) for c in leading] == [padded([]), padded([1002])]
    trailing = chunk_prompt(parse_attention("t1 BREAK"), TOK)
    assert [list(c.tokens) for c in trailing] == [padded([1001])]
    assert prompt_token_count(trailing) == 75


def comma_prompt() -> str:
    # 60 words, a comma at body index 60, then 20 words: 81 tokens.
    return words(0, 60) + " , " + words(60, 80)


def test_comma_backtrack_moves_the_words_after_the_last_comma() -> None:
    first, second = chunk_prompt([(comma_prompt(), 1.0)], TOK)
    # The chunk filled at 75 with the comma 15 back (<= 20): the 14 words after it move on.
    assert list(first.tokens) == padded([*ids(0, 60), COMMA])
    assert list(second.tokens) == padded(ids(60, 80))
    assert first.token_count == 75 and second.token_count == 20


def test_comma_too_far_back_or_backtrack_off_cuts_at_75() -> None:
    expected = [[BOS, *ids(0, 60), COMMA, *ids(60, 74), EOS], padded(ids(74, 80))]
    for backtrack in (14, 0):
        chunks = chunk_prompt([(comma_prompt(), 1.0)], TOK, comma_padding_backtrack=backtrack)
        assert [list(c.tokens) for c in chunks] == expected
    moved = chunk_prompt([(comma_prompt(), 1.0)], TOK, comma_padding_backtrack=15)
    assert list(moved[0].tokens) == padded([*ids(0, 60), COMMA])


def test_moved_tokens_keep_their_weights() -> None:
    parts = [(words(0, 60) + " ,", 1.0), (words(60, 70), 1.21), (words(70, 80), 1.0)]
    first, second = chunk_prompt(parts, TOK)
    assert list(first.multipliers) == flat([1.0] * 61)
    assert list(second.multipliers) == flat([1.21] * 10 + [1.0] * 10)


def test_embedding_occupies_its_vectors_and_records_where() -> None:
    table = EmbeddingTable.build({"my emb": 3}, TOK)
    [chunk] = chunk_prompt([("t1 my emb", 1.0), ("t2", 1.1)], TOK, embeddings=table)
    assert list(chunk.tokens) == padded([1001, *[EMBEDDING_PLACEHOLDER] * 3, 1002])
    assert list(chunk.multipliers) == flat([1.0, 1.0, 1.0, 1.0, 1.1])
    assert chunk.embeddings == (EmbeddingSlot("my emb", 2, 3),)
    assert chunk.token_count == 5


def test_longest_embedding_name_wins() -> None:
    table = EmbeddingTable.build({"my": 1, "my emb": 2}, TOK)
    [chunk] = chunk_prompt([("my emb my", 1.0)], TOK, embeddings=table)
    assert chunk.embeddings == (EmbeddingSlot("my emb", 1, 2), EmbeddingSlot("my", 3, 1))


def test_embedding_is_never_split_across_chunks() -> None:
    table = EmbeddingTable.build({"big": 3}, TOK)
    first, second = chunk_prompt([(words(0, 73) + " big t99", 1.0)], TOK, embeddings=table)
    assert list(first.tokens) == padded(ids(0, 73))
    assert first.embeddings == ()
    assert list(second.tokens) == padded([0, 0, 0, 1099])
    assert second.embeddings == (EmbeddingSlot("big", 1, 3),)


def test_embedding_moves_with_the_comma_backtrack() -> None:
    table = EmbeddingTable.build({"big": 2}, TOK)
    prompt = words(0, 60) + " , " + words(60, 70) + " big " + words(70, 73)
    first, second = chunk_prompt([(prompt, 1.0)], TOK, embeddings=table)
    assert list(first.tokens) == padded([*ids(0, 60), COMMA])
    assert first.embeddings == ()
    assert list(second.tokens) == padded([*ids(60, 70), 0, 0, *ids(70, 73)])
    assert second.embeddings == (EmbeddingSlot("big", 11, 2),)


def test_embedding_longer_than_a_chunk_is_rejected() -> None:
    table = EmbeddingTable.build({"big": 76}, TOK)
    with pytest.raises(InvalidRequest) as error:
        chunk_prompt([("big", 1.0)], TOK, embeddings=table, field="negative_prompt")
    assert error.value.field == "negative_prompt"


def test_openclip_pads_with_zero_after_the_first_eos() -> None:
    [chunk] = chunk_prompt([("t1", 1.0)], TOK, pad_token=0)
    assert list(chunk.tokens) == padded([1001], pad=0)
    [full] = chunk_prompt([(words(0, 75), 1.0)], TOK, pad_token=0)
    assert list(full.tokens) == [BOS, *ids(0, 75), EOS]
    assert list(empty_chunk(TOK, pad_token=0).tokens) == [BOS, EOS] + [0] * 75


_piece = st.one_of(
    st.integers(min_value=1, max_value=40).map(lambda n: ("w", n)),
    st.just((",", 1)),
    st.just(("BREAK", 1)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_piece, max_size=12), st.integers(min_value=0, max_value=30))
def test_chunks_are_77_wide_and_keep_every_token_in_order(pieces: list, backtrack: int) -> None:
    parts: list[tuple[str, float]] = []
    expected: list[int] = []
    counter = 0
    for kind, n in pieces:
        if kind == "BREAK":
            parts.append(("BREAK", -1.0))
        elif kind == ",":
            parts.append((",", 1.0))
            expected.append(COMMA)
        else:
            parts.append((words(counter, counter + n), 1.0))
            expected.extend(ids(counter, counter + n))
            counter += n
    chunks: list[Chunk] = chunk_prompt(parts, TOK, comma_padding_backtrack=backtrack)
    assert chunks
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.multipliers) == CHUNK_LENGTH + 2
        assert chunk.tokens[0] == BOS and chunk.tokens[-1] == EOS
    seen = [t for chunk in chunks for t in chunk.tokens if t not in (BOS, EOS)]
    assert seen == expected


def test_real_clip_tokenizer_comma_and_ids() -> None:
    tokenizer_module = pytest.importorskip("sdserver.models.tokenizer")
    clip = tokenizer_module.CLIPTokenizer.load()
    assert clip.comma_id == 267
    [chunk] = chunk_prompt(parse_attention("a photo of a (cat), a photo"), clip)
    # "a photo of a cat" is [320, 1125, 539, 320, 2368] in CLIP's vocabulary.
    assert list(chunk.tokens[:10]) == [49406, 320, 1125, 539, 320, 2368, 267, 320, 1125, 49407]
    assert list(chunk.multipliers[:10]) == [1.0, 1.0, 1.0, 1.0, 1.0, 1.1, 1.0, 1.0, 1.0, 1.0]
