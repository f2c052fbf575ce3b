"""A1111's prompt language as pure functions over strings (no torch).

A prompt goes through these steps, in this order (as A1111 1.10 does):

1. `strip_comments`: `#` to the end of the line is removed (option `enable_prompt_comments`).
2. Extra networks (`<lora:name:1>`) are taken out: `sdserver.pipeline.extra_networks`.
3. `split_and`: composable sub-prompts `a :1.2 AND b`, each with its weight.
4. `prompt_schedule`: each sub-prompt becomes a list of `(end_at_step, text)` for prompt editing
   `[from:to:when]` and alternation `[a|b]`. Conditioning is computed once per entry, not per step.
5. `parse_attention`: each scheduled text becomes `(text, weight)` parts for emphasis `(x)`, `[x]`, `(x:1.3)`.
6. Token chunking (`sdserver.pipeline.chunking`) and emphasis (`sdserver.pipeline.emphasis`).

Behaviour follows A1111's `modules/prompt_parser.py` (read for facts); the code is our own. The scheduling
grammar is parsed with a small recursive-descent parser instead of a lark Earley parser.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

# (x) multiplies by 1.1 and [x] by 1/1.1: A1111 multiplies by the reciprocal, not dividing, so weights come
# out bit-identical to its floats (1 / 1.1 * x and x / 1.1 can differ in the last bit).
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# The part parse_attention emits for the word BREAK; chunking starts a new 75-token chunk on it.
BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
# `:1.3)` closing a weighted round bracket; whitespace around the number is allowed (A1111 1.7+).
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ATTENTION_SPECIAL = frozenset("\\()[]:")
_ESCAPABLE = frozenset("()[]\\")


def is_break(part: tuple[str, float]) -> bool:
    """True for the BREAK marker emitted by parse_attention (a BREAK inside brackets is plain text)."""
    return part[0] == BREAK_TEXT and part[1] == BREAK_WEIGHT


# --------------------------------------------------------------------------------------------------------------
# Emphasis


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into `(text, weight)` parts, as A1111's parse_prompt_attention.

    `(x)` ×1.1, `[x]` ×1/1.1, `(x:1.3)` ×1.3; nesting multiplies; brackets left open close at the end;
    `\\(` `\\)` `\\[` `\\]` `\\\\` are literal; a stray `)`, `]` or `:1.3)` is literal text; the word BREAK becomes
    the separate part ("BREAK", -1); adjacent parts with equal weights merge; an empty text gives [("", 1.0)].

    One deliberate difference: A1111 raises on an unreadable weight such as `(a:1.2.3)`; here its `:` is
    read as plain text and the bracket closes with ×1.1.
    """
    parts: list[list] = []  # [text, weight] pairs, mutated in place as brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, multiplier: float) -> None:
        for part in parts[start:]:
            part[1] *= multiplier

    def add_text(chunk: str) -> None:
        for index, piece in enumerate(_BREAK_SPLIT.split(chunk)):
            if index > 0:
                parts.append([BREAK_TEXT, BREAK_WEIGHT])
            parts.append([piece, 1.0])

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            following = text[i + 1 : i + 2]
            if following and following in _ESCAPABLE:
                parts.append([following, 1.0])
                i += 2
            else:
                # A backslash escaping nothing is dropped, leaving an empty part (as A1111).
                parts.append(["", 1.0])
                i += 1
        elif char == "(":
            round_open.append(len(parts))
            i += 1
        elif char == "[":
            square_open.append(len(parts))
            i += 1
        elif char == ":":
            match = _WEIGHT_CLOSE.match(text, i)
            weight = _to_float(match.group(1)) if match else None
            if weight is None:
                add_text(":")
                i += 1
            elif round_open:
                scale_from(round_open.pop(), weight)
                i = match.end()
            else:
                add_text(match.group(0))
                i = match.end()
        elif char == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
            i += 1
        elif char == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
            i += 1
        elif char in ")]":
            add_text(char)
            i += 1
        else:
            end = i + 1
            while end < n and text[end] not in _ATTENTION_SPECIAL:
                end += 1
            add_text(text[i:end])
            i = end

    for start in round_open:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not parts:
        return [("", 1.0)]
    merged: list[list] = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(part_text, weight) for part_text, weight in merged]


def _to_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Comments and composable prompts

_WHOLE_LINE_COMMENT = re.compile(r"(?:^|\n)#[^\n]*(?:\n|$)")
_TRAILING_COMMENT = re.compile(r"#[^\n]*(?:\n|$)")


def strip_comments(text: str) -> str:
    """Remove `#` comments to the end of the line (A1111 1.8+, option `enable_prompt_comments`).

    A removed comment leaves its line break behind, so `a # note` becomes "a \\n", as in A1111.
    """
    text = _WHOLE_LINE_COMMENT.sub("\n", text)
    return _TRAILING_COMMENT.sub("\n", text)


_AND = re.compile(r"\bAND\b")
# The shortest text such that what remains is an optional `:weight` and whitespace.
_SUBPROMPT_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a composable prompt on the word AND into `(text, weight)`, as A1111's get_multicond_prompt_list.

    `a castle AND a dragon :0.7` → [("a castle", 1.0), (" a dragon", 0.7)]. Trailing whitespace is dropped
    from each text; leading whitespace stays (it is part of what A1111 encodes).
    """
    result = []
    for sub_prompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.fullmatch(sub_prompt)
        assert match is not None  # the lazy text group can always absorb everything
        weight = match.group(2)
        result.append((match.group(1), float(weight) if weight is not None else 1.0))
    return result


# --------------------------------------------------------------------------------------------------------------
# Prompt editing and alternation
#
# The language (A1111's grammar, restated):
#   top       := (prompt | a stray one of "[]():")*      anything else, e.g. a bare "|", makes the prompt literal
#   prompt    := (round | square | plain)*
#   round     := "(" prompt ")" | "(" prompt ":" prompt ")"
#   square    := "[" prompt "]"
#              | "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"      (editing)
#              | "[" prompt ("|" prompt?)+ "]"                       (alternation)
#   plain     := (any char but \ [ ] ( ) : |  or  "\" + any char but a newline)+
# Round brackets and plain square brackets stay in the text: emphasis is parsed later, by parse_attention.


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True)
class _Edit:
    before: _Seq | None  # None: `[to:when]`, nothing before the switch
    after: _Seq
    when: str  # the number as written: "." in it means a fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple[_Seq, ...]


_Node = Union[_Text, _Seq, _Edit, _Alternate]

_PLAIN_STOP = frozenset("\\[]():|")
_STRAY = frozenset("[]():")
# lark's SIGNED_NUMBER: sign, then an exponent form, a decimal (with optional exponent) or an integer.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_SPACE = re.compile(r"\s*")
# Deeper bracket nesting than this is treated as unparseable (the prompt is then used literally) so that a
# hostile prompt cannot exhaust Python's recursion limit.
_MAX_NESTING = 100


class _TooDeep(Exception):
    pass


class _ScheduleParser:
    """Recursive descent over one prompt. Bracket results are memoised by position, so retrying a failed
    bracket as a stray character costs nothing and parsing stays linear."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[int, tuple[_Node, int] | None] = {}

    def parse(self) -> _Seq | None:
        text, items, i = self.text, [], 0
        while i < len(text):
            sequence, end = self.prompt(i, 0)
            if end > i:
                items.append(sequence)
                i = end
            elif text[i] in _STRAY:
                items.append(_Text(text[i]))
                i += 1
            else:
                return None
        return _Seq(tuple(items))

    def prompt(self, i: int, depth: int) -> tuple[_Seq, int]:
        text, items = self.text, []
        while i < len(text):
            char = text[i]
            if char in "([":
                bracket = self.bracket(i, depth + 1)
                if bracket is None:
                    break
                node, i = bracket
                items.append(node)
            elif char in _PLAIN_STOP and char != "\\":
                break
            else:
                end = self.plain_end(i)
                if end == i:
                    break
                items.append(_Text(text[i:end]))
                i = end
        return _Seq(tuple(items)), i

    def plain_end(self, i: int) -> int:
        text = self.text
        while i < len(text):
            char = text[i]
            if char == "\\":
                if i + 1 < len(text) and text[i + 1] != "\n":
                    i += 2
                    continue
                break
            if char in _PLAIN_STOP:
                break
            i += 1
        return i

    def bracket(self, i: int, depth: int) -> tuple[_Node, int] | None:
        if i in self.memo:
            return self.memo[i]
        if depth > _MAX_NESTING:
            raise _TooDeep
        result = self.round(i, depth) if self.text[i] == "(" else self.square(i, depth)
        self.memo[i] = result
        return result

    def at(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def round(self, i: int, depth: int) -> tuple[_Node, int] | None:
        first, j = self.prompt(i + 1, depth)
        if self.at(j) == ")":
            return _Seq((_Text("("), first, _Text(")"))), j + 1
        if self.at(j) == ":":
            second, k = self.prompt(j + 1, depth)
            if self.at(k) == ")":
                return _Seq((_Text("("), first, _Text(":"), second, _Text(")"))), k + 1
        return None

    def square(self, i: int, depth: int) -> tuple[_Node, int] | None:
        first, j = self.prompt(i + 1, depth)
        closer = self.at(j)
        if closer == "]":
            return _Seq((_Text("["), first, _Text("]"))), j + 1
        if closer == "|":
            options = [first]
            while self.at(j) == "|":
                option, j = self.prompt(j + 1, depth)
                options.append(option)
            return (_Alternate(tuple(options)), j + 1) if self.at(j) == "]" else None
        if closer == ":":
            when = self.when(j + 1)
            if when is not None:
                return _Edit(None, first, when[0]), when[1]
            second, k = self.prompt(j + 1, depth)
            if self.at(k) == ":":
                when = self.when(k + 1)
                if when is not None:
                    return _Edit(first, second, when[0]), when[1]
        return None

    def when(self, i: int) -> tuple[str, int] | None:
        """`ws? NUMBER ws? ]` at i: the number's text and the position after the `]`."""
        i = _SPACE.match(self.text, i).end()
        number = _NUMBER.match(self.text, i)
        if number is None:
            return None
        end = _SPACE.match(self.text, number.end()).end()
        return (number.group(0), end + 1) if self.at(end) == "]" else None


def _parse_schedule_tree(prompt: str) -> _Seq | None:
    try:
        return _ScheduleParser(prompt).parse()
    except _TooDeep:
        return None


@dataclass(frozen=True)
class _Timeline:
    """How a `when` number maps to a step of the pass being scheduled."""

    steps: int
    int_offset: int
    fraction_offset: float
    old: bool

    def resolve(self, when: str) -> int:
        value = float(when)
        if self.old:
            # Before 1.8: below 1 is a fraction, otherwise a step, whatever the notation.
            value = value * self.steps if value < 1 else value
        elif "." in when:
            value = (value - self.fraction_offset) * self.steps
        else:
            value = value - self.int_offset
        if math.isinf(value):
            return self.steps if value > 0 else -1
        return min(self.steps, int(value))


def _walk(node: _Node) -> Iterable[_Node]:
    yield node
    if isinstance(node, _Seq):
        for item in node.items:
            yield from _walk(item)
    elif isinstance(node, _Edit):
        if node.before is not None:
            yield from _walk(node.before)
        yield from _walk(node.after)
    elif isinstance(node, _Alternate):
        for option in node.options:
            yield from _walk(option)


def _render(node: _Node, step: int, timeline: _Timeline) -> str:
    if isinstance(node, _Text):
        return node.text
    if isinstance(node, _Seq):
        return "".join(_render(item, step, timeline) for item in node.items)
    if isinstance(node, _Edit):
        if step <= timeline.resolve(node.when):
            return _render(node.before, step, timeline) if node.before is not None else ""
        return _render(node.after, step, timeline)
    return _render(node.options[(step - 1) % len(node.options)], step, timeline)


def prompt_schedule(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The texts a prompt needs, each with the last step it is used for, as A1111's
    get_learned_conditioning_prompt_schedules.

    `[from:to:when]`, `[to:when]`, `[from::when]`: `when` with a "." is a fraction of the pass's steps, an
    integer is a step. `[a|b]` alternates every step (an empty slot is allowed). A prompt that does not
    parse is used literally. `steps` is the first pass's step count (A1111 passes the sampler's total steps,
    doubled for second-order samplers). For the hires pass give `hires_steps`: then integers count steps
    across both passes and fractions 1..2 fall in the hires pass. `use_old_scheduling` restores the pre-1.8
    rule (below 1 a fraction, else a step; A1111 then also keeps `steps`, not `hires_steps`, as the length).

    >>> prompt_schedule("a [b:3]", 10)
    [(3, 'a '), (10, 'a b')]
    """
    if hires_steps is None or use_old_scheduling:
        timeline = _Timeline(steps, 0, 0.0, use_old_scheduling)
    else:
        timeline = _Timeline(hires_steps, steps, 1.0, False)
    tree = _parse_schedule_tree(prompt)
    if tree is None:
        return [(timeline.steps, prompt)]

    boundaries = {timeline.steps}
    for node in _walk(tree):
        if isinstance(node, _Edit):
            when = timeline.resolve(node.when)
            if when >= 1:
                boundaries.add(when)
        elif isinstance(node, _Alternate):
            boundaries.update(range(1, timeline.steps + 1))
    return [(boundary, _render(tree, boundary, timeline)) for boundary in sorted(boundaries)]


def unique_schedules(
    prompts: Iterable[str], steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> dict[str, list[tuple[int, str]]]:
    """The schedule of each distinct prompt of a batch, in first-seen order, so that a batch of N equal
    prompts is conditioned once. For A1111's emphasis numbers, encode one schedule's texts as one batch:
    the "Original" emphasis restores the mean over that batch."""
    schedules: dict[str, list[tuple[int, str]]] = {}
    for prompt in prompts:
        if prompt not in schedules:
            schedules[prompt] = prompt_schedule(
                prompt, steps, hires_steps=hires_steps, use_old_scheduling=use_old_scheduling
            )
    return schedules


def schedule_index_at(schedule: Sequence[tuple[int, str]], step: int) -> int:
    """Which entry of a schedule applies at the sampler's 0-based `step` (A1111's reconstruct_cond_batch):
    the first entry whose end step is >= step, or the first entry past the end."""
    for index, (end_at_step, _text) in enumerate(schedule):
        if step <= end_at_step:
            return index
    return 0
