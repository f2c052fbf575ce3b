"""The fixed prompt sets the demo evaluation generates: deterministic given (n, seed), so two runs, or two
checkpoints, are scored on exactly the same prompts and seeds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sdserver.demo.dataset import Colour, Layout, Position, Scene, Shape, Size, describe, draw_layout, parse_prompt

# Which optional attributes an adherence prompt names, cycled so each gets about a fifth of the prompts.
KINDS: tuple[tuple[str, ...], ...] = (
    (),
    ("background",),
    ("size",),
    ("position",),
    ("background", "size", "position"),
)

# Seeds of the three prompt sets live in separate ranges so growing one set never reuses another's seeds.
_NEGATIVE_SEED_OFFSET = 100_000
_RECOLOUR_SEED_OFFSET = 200_000


@dataclass(frozen=True)
class Case:
    """One txt2img generation to score: what is asked, with which seed, and what it names."""

    prompt: str
    seed: int
    expected: dict[str, str]


@dataclass(frozen=True)
class RecolourCase:
    """img2img: `init` drawn with `layout` is the init image; `prompt` asks for the same shape in `target`."""

    init: Scene
    layout: Layout
    prompt: str
    target: Colour
    seed: int


def _case(prompt: str, seed: int) -> Case:
    return Case(prompt=prompt, seed=seed, expected=parse_prompt(prompt))


def _other_colour(rng: np.random.Generator, avoid: set[Colour]) -> Colour:
    choices = [c for c in Colour if c not in avoid]
    return choices[int(rng.integers(len(choices)))]


def adherence_cases(n: int, seed: int) -> list[Case]:
    """`n` prompts that all name a colour and a shape; every colour x shape pair comes once in each run of
    32 prompts, and the kinds in KINDS cycle so background, size and position are each named by ~n/5."""
    rng = np.random.default_rng([seed, 1])
    pairs = list(itertools.product(Colour, Shape))
    cases: list[Case] = []
    for i in range(n):
        if i % len(pairs) == 0:
            order = rng.permutation(len(pairs))
        colour, shape = pairs[order[i % len(pairs)]]
        scene = Scene(
            shape=shape,
            colour=colour,
            background=_other_colour(rng, {colour}),
            size=list(Size)[int(rng.integers(len(Size)))],
            position=list(Position)[int(rng.integers(len(Position)))],
        )
        named = KINDS[i % len(KINDS)]
        prompt = describe(scene, **{attribute: True for attribute in named})
        cases.append(_case(prompt, seed + i))
    return cases


def colourless_cases(n: int, seed: int, avoid: Colour = Colour.RED) -> list[Case]:
    """`n` prompts naming no colour ("a star", "a circle on a blue background"), for the negative-prompt
    test. A named background is never `avoid`, which would rule that colour out for the shape anyway."""
    rng = np.random.default_rng([seed, 2])
    cases: list[Case] = []
    for i in range(n):
        scene = Scene(
            shape=list(Shape)[i % len(Shape)],
            colour=avoid,  # not named
            background=_other_colour(rng, {avoid}),
            size=Size.SMALL,
            position=Position.CENTRE,
        )
        prompt = describe(scene, colour=False, background=bool((i // len(Shape)) % 2))
        cases.append(_case(prompt, seed + _NEGATIVE_SEED_OFFSET + i))
    return cases


def recolour_cases(
    n: int, seed: int, source: Colour = Colour.RED, target: Colour = Colour.BLUE, shape: Shape = Shape.CIRCLE
) -> list[RecolourCase]:
    """`n` init images of a `source` shape (any size, position and background other than the two colours)
    with the prompt "a `target` `shape`"."""
    rng = np.random.default_rng([seed, 3])
    cases: list[RecolourCase] = []
    for i in range(n):
        init = Scene(
            shape=shape,
            colour=source,
            background=_other_colour(rng, {source, target}),
            size=list(Size)[i % len(Size)],
            position=list(Position)[(i // len(Size)) % len(Position)],
        )
        prompt = describe(Scene(shape, target, init.background, init.size, init.position))
        cases.append(RecolourCase(init, draw_layout(init, rng), prompt, target, seed + _RECOLOUR_SEED_OFFSET + i))
    return cases
