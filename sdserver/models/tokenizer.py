"""CLIP's byte-level BPE tokenizer over the shipped vocabulary, offline.

Re-implements OpenAI CLIP's `simple_tokenizer` (MIT, Copyright (c) 2021 OpenAI; see data/NOTICE): text is
cleaned (NFC, HTML unescape, whitespace collapse, lower case), split with CLIP's regex, each piece mapped
byte → printable unicode character, then merged by BPE rank. Ids match the ones every SD text encoder was
trained with.
"""

from __future__ import annotations

import gzip
import html
import unicodedata
from importlib import resources
from pathlib import Path

import regex

from sdserver.errors import ModelLoadError

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP uses the first 48,894 merges of the file: 49408 ids = 2 x 256 byte tokens + merges + 2 specials.
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_SELF_CHECK = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])
_BPE_CACHE_LIMIT = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """Byte → printable character: bytes that are printable map to themselves, the rest to chars from 256 up,
    so BPE never sees whitespace or control characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


# The parts of ftfy.fix_text (which A1111's tokenizer runs) that change CLIP tokens of typed prompts: curly
# quotes, Latin ligatures, full-width forms, and invisible format/control characters.
_UNCURL = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij"})
_FULL_WIDTH = regex.compile(r"[\u3000\uff01-\uffef]+")
_INVISIBLE = regex.compile(
    r"[\x00-\x08\x0b\x0e-\x1f\x7f\ufeff\u206a-\u206f\ufff9-\ufffc\U0001d173-\U0001d17a\U000e0000-\U000e007f]"
)


def _fix_text(text: str) -> str:
    text = _INVISIBLE.sub("", text).translate(_UNCURL).translate(_LIGATURES)
    text = _FULL_WIDTH.sub(lambda m: unicodedata.normalize("NFKC", m.group(0)), text)
    return unicodedata.normalize("NFC", text)


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy-style fixes, HTML entities decoded, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _default_vocab_path() -> Path:
    return Path(str(resources.files("sdserver.models") / "data" / "bpe_simple_vocab_16e6.txt.gz"))


class CLIPTokenizer:
    """encode/decode between text and CLIP token ids. `encode` returns ids without BOS/EOS."""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self._byte_encoder = bytes_to_unicode()
        byte_chars = list(self._byte_encoder.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars]
        vocab += ["".join(pair) for pair in merges]
        vocab += [BOS_TOKEN, EOS_TOKEN]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {pair: i for i, pair in enumerate(merges)}
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
        # Specials are whole tokens, never BPE-split.
        self._bpe_cache: dict[str, list[str]] = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}

    @classmethod
    def load(cls, path: Path | None = None) -> CLIPTokenizer:
        """Read the shipped vocabulary and check it produces CLIP's known ids (raises ModelLoadError if not)."""
        vocab_path = path or _default_vocab_path()
        try:
            with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except OSError as exc:
            raise ModelLoadError(f"can't read the CLIP vocabulary {vocab_path}: {exc}") from exc
        # Line 0 is a version header.
        merges = [tuple(line.split()) for line in lines[1 : 1 + _MERGE_COUNT]]
        if len(merges) != _MERGE_COUNT or any(len(m) != 2 for m in merges):
            raise ModelLoadError(f"CLIP vocabulary {vocab_path} is damaged: expected {_MERGE_COUNT} merges")
        tokenizer = cls(merges)  # type: ignore[arg-type]
        tokenizer._self_check(vocab_path)
        return tokenizer

    def _self_check(self, vocab_path: Path) -> None:
        text, expected = _SELF_CHECK
        got = [self.bos_id, *self.encode(text), self.eos_id]
        if self.vocab_size != VOCAB_SIZE or got != expected:
            raise ModelLoadError(
                f"CLIP vocabulary {vocab_path} is wrong: {self.vocab_size} entries, "
                f"'{text}' encodes to {got} instead of {expected}"
            )

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)

    @property
    def bos_id(self) -> int:
        return self._encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    @property
    def comma_id(self) -> int:
        """The id of a word-final "," — where A1111's chunking prefers to cut a long prompt."""
        return self._encoder[",</w>"]

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (e.g. "cat</w>"), or None."""
        return self._encoder.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._decoder[token_id]

    def _bpe(self, piece: str) -> list[str]:
        if (hit := self._bpe_cache.get(piece)) is not None:
            return hit
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self._ranks.get(p, float("inf")))
            if best not in self._ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._bpe_cache) < _BPE_CACHE_LIMIT:
            self._bpe_cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for match in self._pattern.findall(clean_text(text)):
            piece = "".join(self._byte_encoder[b] for b in match.encode("utf-8"))
            ids.extend(self._encoder[token] for token in self._bpe(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; word ends become spaces, specials stay visible."""
        return _decode_tokens([self._decoder[i] for i in ids], self._byte_decoder)


def _decode_tokens(tokens: list[str], byte_decoder: dict[str, int]) -> str:
    out = bytearray()
    for token in tokens:
        if token in (BOS_TOKEN, EOS_TOKEN):
            out.extend(token.encode("utf-8"))
            continue
        word_end = token.endswith("</w>")
        body = token[:-4] if word_end else token
        out.extend(byte_decoder[c] for c in body)
        if word_end:
            out.extend(b" ")
    return out.decode("utf-8", errors="replace").strip()
