import time

import pytest

from sdserver.models.tokenizer import CLIPTokenizer, bytes_to_unicode, clean_text

# Reference ids from OpenAI CLIP / HF CLIPTokenizer (published in other projects' golden tests).
GOLDEN = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("a photo of an astronaut riding a horse on mars", [320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496]),
    ("hello-world, 3.14 (test)", [3306, 268, 1002, 267, 274, 269, 272, 275, 263, 1628, 264]),
    ("hello world?", [3306, 1002, 286]),
    ("it's a cat's toy, running   fast", [585, 568, 320, 2368, 568, 5988, 267, 2761, 1953]),
    ("a cat & a dog", [320, 2368, 261, 320, 1929]),
    ("don't stop 42 times", [847, 713, 1691, 275, 273, 1661]),
    ("caf\u00e9 \u00fcber na\u00efve", [15304, 6522, 1516, 1097, 35689, 563]),
    ("Hello World 123", [3306, 1002, 272, 273, 274]),
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.load()


@pytest.mark.parametrize(("text", "ids"), GOLDEN)
def test_known_encodings(tok: CLIPTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text) == ids


def test_specials_and_size(tok: CLIPTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert tok.bos_id == 49406 and tok.eos_id == 49407
    assert tok.token_to_id("<|startoftext|>") == 49406
    assert tok.token_to_id("cat</w>") == 2368
    assert tok.comma_id == 267 == tok.encode("a, b")[1]
    assert tok.token_to_id("no such token") is None
    assert tok.encode("") == []


def test_html_and_whitespace_cleaning(tok: CLIPTokenizer) -> None:
    assert clean_text("  A&amp;B \n\t C ") == "a&b c"
    assert tok.encode("a &amp; b") == tok.encode("a & b")
    assert tok.encode("A   PHOTO\nof a Cat") == tok.encode("a photo of a cat")


@pytest.mark.parametrize(
    ("typed", "plain"),
    [
        ("it\u2019s a \u201ccat\u201d", 'it\'s a "cat"'),
        ("\ufb01sh", "fish"),
        ("\uff21\uff22\uff23\u3000\uff11", "ABC 1"),
        ("\ufeffa\x07cat", "acat"),
    ],
)
def test_ftfy_style_fixes_as_a1111(tok: CLIPTokenizer, typed: str, plain: str) -> None:
    assert tok.encode(typed) == tok.encode(plain)


def test_every_vocab_entry_round_trips(tok: CLIPTokenizer) -> None:
    for i in range(tok.vocab_size):
        assert tok.token_to_id(tok.id_to_token(i)) == i


def test_byte_map_is_a_bijection() -> None:
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(not c.isspace() for c in mapping.values())


@pytest.mark.parametrize("text", ["a photo of a cat", "caf\u00e9 \u00fcber", "\u6771\u4eac \U0001f431", "3.14, (x)"])
def test_decode_inverts_encode_up_to_spacing(tok: CLIPTokenizer, text: str) -> None:
    decoded = tok.decode(tok.encode(text))
    assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")


def test_unicode_bytes_survive(tok: CLIPTokenizer) -> None:
    ids = tok.encode("\U0001f431")
    assert ids and tok.decode(ids) == "\U0001f431"


def test_load_is_fast_and_instances_are_independent() -> None:
    start = time.perf_counter()
    a = CLIPTokenizer.load()
    assert time.perf_counter() - start < 1.0
    b = CLIPTokenizer.load()
    a.encode("zebra")
    assert "zebra" in a._bpe_cache and "zebra" not in b._bpe_cache
