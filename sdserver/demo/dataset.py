"""Procedural training data for the demo model: one coloured shape on a coloured background, with a caption.

A scene is five discrete attributes (shape, colour, background, size, position). Rendering adds a little
continuous jitter (`Layout`) so the model sees variety, but never enough to make a class ambiguous: the
classifier in `sdserver.demo.classifier` must recover every attribute from the pixels.

Shapes are drawn from a signed distance function evaluated once per output pixel; the alpha
`clip(0.5 - distance_px, 0, 1)` is a one-pixel box-filter edge, so images are anti-aliased without
supersampling (about 10k images/s at 64 px on one core).

Everything random comes from an explicit `numpy.random.Generator`, so a seed fixes the data.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


class Shape(enum.StrEnum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    STAR = "star"


class Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"
    PURPLE = "purple"
    ORANGE = "orange"
    WHITE = "white"
    BLACK = "black"


class Size(enum.StrEnum):
    SMALL = "small"
    LARGE = "large"


class Position(enum.StrEnum):
    CENTRE = "centre"
    TOP_LEFT = "top left"
    TOP_RIGHT = "top right"
    BOTTOM_LEFT = "bottom left"
    BOTTOM_RIGHT = "bottom right"


# Chosen far apart in RGB: the closest pair (orange, yellow) is 112 apart, so blur, noise and a VAE's
# colour drift still snap to the right name.
PALETTE: dict[Colour, tuple[int, int, int]] = {
    Colour.RED: (220, 0, 0),
    Colour.GREEN: (0, 180, 0),
    Colour.BLUE: (0, 40, 255),
    Colour.YELLOW: (255, 240, 0),
    Colour.PURPLE: (140, 0, 170),
    Colour.ORANGE: (255, 128, 0),
    Colour.WHITE: (255, 255, 255),
    Colour.BLACK: (0, 0, 0),
}

# Sizes are a "radius" h in image widths. Each shape's own extent is h times a factor (SHAPE_GEOMETRY),
# tuned so the four shapes look about equally big. Large is twice small: a 4x area ratio the model and the
# classifier can't confuse.
SIZE_RADIUS: dict[Size, float] = {Size.SMALL: 0.12, Size.LARGE: 0.24}

# Offset of a corner position from the image centre, per size: as far out as the shape can go without
# leaving the image (large shapes have less room). Large corners are still 0.14 of the width from the
# centre, several times the position jitter.
CORNER_OFFSET: dict[Size, float] = {Size.SMALL: 0.24, Size.LARGE: 0.14}

_POSITION_SIGNS: dict[Position, tuple[int, int]] = {
    Position.CENTRE: (0, 0),
    Position.TOP_LEFT: (-1, -1),
    Position.TOP_RIGHT: (1, -1),
    Position.BOTTOM_LEFT: (-1, 1),
    Position.BOTTOM_RIGHT: (1, 1),
}

# Jitter bounds. Small enough that every attribute stays unambiguous (see module docstring).
POSITION_JITTER = 0.02  # image widths, each axis
SCALE_JITTER = 0.08  # relative
ROTATION_JITTER_DEG: dict[Shape, float] = {
    Shape.CIRCLE: 0.0,
    Shape.SQUARE: 8.0,  # more and a square starts to read as a diamond
    Shape.TRIANGLE: 12.0,
    Shape.STAR: 12.0,
}


@dataclass(frozen=True)
class ShapeGeometry:
    """A shape as a regular star polygon: `points` tips at `outer` x h, notches at `inner` x outer.

    A regular polygon is the star whose notches lie on its edges (inner = cos(pi/points)); a circle has
    points = 0. `area` is the shape's area in units of h^2, used to turn a measured area back into h.
    """

    points: int
    outer: float
    inner: float
    base_rotation: float = 0.0  # radians; tips start pointing up

    @property
    def area(self) -> float:
        if self.points == 0:
            return math.pi * self.outer**2
        # `points` kites, each two triangles (centre, tip, notch) with the angle pi/points at the centre.
        return self.points * self.outer**2 * self.inner * math.sin(math.pi / self.points)


SHAPE_GEOMETRY: dict[Shape, ShapeGeometry] = {
    Shape.CIRCLE: ShapeGeometry(points=0, outer=1.0, inner=1.0),
    # Turned an eighth so its sides, not its corners, face up: a square, not a diamond.
    Shape.SQUARE: ShapeGeometry(points=4, outer=1.2, inner=math.cos(math.pi / 4), base_rotation=math.pi / 4),
    Shape.TRIANGLE: ShapeGeometry(points=3, outer=1.3, inner=math.cos(math.pi / 3)),
    # Notches at 0.45 of the tips: plumper than a pentagram (0.38) so the tips survive blur at 64 px.
    Shape.STAR: ShapeGeometry(points=5, outer=1.25, inner=0.45),
}

_UP = -math.pi / 2  # image y grows downwards; tips of triangles and stars point up


@dataclass(frozen=True)
class Scene:
    shape: Shape
    colour: Colour
    background: Colour
    size: Size
    position: Position

    def attributes(self) -> dict[str, str]:
        return {
            "shape": str(self.shape),
            "colour": str(self.colour),
            "background": str(self.background),
            "size": str(self.size),
            "position": str(self.position),
        }


@dataclass(frozen=True)
class Layout:
    """Where exactly the shape lands: centre (image widths, y down), radius h, rotation (radians)."""

    cx: float
    cy: float
    radius: float
    rotation: float


def anchor(size: Size, position: Position) -> tuple[float, float]:
    """The nominal centre of a shape of this size at this position, in image widths."""
    sx, sy = _POSITION_SIGNS[position]
    off = CORNER_OFFSET[size]
    return 0.5 + sx * off, 0.5 + sy * off


def random_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene with foreground colour different from the background."""
    colours = list(Colour)
    colour_index, background_offset = rng.integers(len(colours)), rng.integers(1, len(colours))
    return Scene(
        shape=list(Shape)[rng.integers(len(Shape))],
        colour=colours[colour_index],
        background=colours[(colour_index + background_offset) % len(colours)],
        size=list(Size)[rng.integers(len(Size))],
        position=list(Position)[rng.integers(len(Position))],
    )


def draw_layout(scene: Scene, rng: np.random.Generator) -> Layout:
    """Jitter the scene's nominal placement. Always draws four numbers, so streams stay aligned."""
    jx, jy, js, jr = rng.uniform(-1.0, 1.0, size=4)
    ax, ay = anchor(scene.size, scene.position)
    return Layout(
        cx=ax + POSITION_JITTER * jx,
        cy=ay + POSITION_JITTER * jy,
        radius=SIZE_RADIUS[scene.size] * (1.0 + SCALE_JITTER * js),
        rotation=math.radians(ROTATION_JITTER_DEG[scene.shape]) * jr,
    )


Window = tuple[slice, slice]  # (rows, columns) of the image to compute


def signed_distance(shape: Shape, layout: Layout, size_px: int, window: Window | None = None) -> np.ndarray:
    """Signed distance in pixels from each pixel centre to the shape's outline (negative inside), [H, W], or
    just the `window` of it."""
    geometry = SHAPE_GEOMETRY[shape]
    grid = (np.arange(size_px, dtype=np.float32) + 0.5) / size_px
    rows, cols = window or (slice(None), slice(None))
    px = (grid[cols] - np.float32(layout.cx))[None, :]
    py = (grid[rows] - np.float32(layout.cy))[:, None]
    outer = geometry.outer * layout.radius
    rho = np.hypot(px, py)
    if geometry.points == 0:
        return (rho - outer) * size_px
    # Fold the plane into one half-sector (tip at angle 0, notch at pi/points): there the outline is a
    # single segment, so the distance is one segment distance instead of 2*points of them.
    half = math.pi / geometry.points
    theta = np.mod(np.arctan2(py, px) - (_UP + geometry.base_rotation + layout.rotation), 2 * half)
    phi = np.minimum(theta, 2 * half - theta)
    qx, qy = rho * np.cos(phi), rho * np.sin(phi)
    tip_x, tip_y = outer, 0.0
    notch_x, notch_y = outer * geometry.inner * math.cos(half), outer * geometry.inner * math.sin(half)
    ex, ey = notch_x - tip_x, notch_y - tip_y
    length_sq = ex * ex + ey * ey
    t = np.clip(((qx - tip_x) * ex + (qy - tip_y) * ey) / length_sq, 0.0, 1.0)
    dist = np.hypot(qx - (tip_x + t * ex), qy - (tip_y + t * ey))
    # The cross product (tip -> notch) x (tip -> q) is positive on the centre's side of the edge.
    side = -np.sign(ex * (qy - tip_y) - ey * (qx - tip_x))
    return (dist * side * size_px).astype(np.float32)


def coverage(shape: Shape, layout: Layout, size_px: int, window: Window | None = None) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 [H, W] in [0, 1] (one-pixel linear edge), or just the
    `window` of it."""
    return np.clip(0.5 - signed_distance(shape, layout, size_px, window), 0.0, 1.0)


def render_layout(scene: Scene, layout: Layout, size_px: int) -> np.ndarray:
    """The scene drawn with an explicit layout: uint8 [size_px, size_px, 3]."""
    alpha = coverage(scene.shape, layout, size_px)[:, :, None]
    fg = np.asarray(PALETTE[scene.colour], dtype=np.float32)
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def render(scene: Scene, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """The scene drawn with a random jitter from `rng`: uint8 [size_px, size_px, 3]."""
    return render_layout(scene, draw_layout(scene, rng), size_px)


# --- captions -----------------------------------------------------------------------------------------

# How often a caption names each optional attribute. Omitted attributes are still random in the scene,
# which is what teaches the model its defaults (e.g. "a circle" may be any colour, anywhere).
P_COLOUR = 0.85
P_BACKGROUND = 0.5
P_SIZE = 0.5
P_POSITION = 0.5
P_COLOUR_ONLY = 0.04  # bare "red": teaches a colour word on its own, which negative prompts rely on
P_ARTICLE = 0.7

_BACKGROUND_FORMS = ("on {a} {c} background", "on {c}", "on {a} {c} backdrop", "with {a} {c} background")
_POSITION_FORMS: dict[Position, tuple[str, ...]] = {
    Position.CENTRE: ("in the centre", "in the center", "at the centre", "at the center", "in the middle"),
    **{
        p: ("in the {}", "at the {}", "in the {} corner")
        for p in (Position.TOP_LEFT, Position.TOP_RIGHT, Position.BOTTOM_LEFT, Position.BOTTOM_RIGHT)
    },
}


def article(next_word: str) -> str:
    """ "a" or "an", for the word that follows."""
    return "an" if next_word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption of the scene: "a small red circle on a blue background in the top left",
    "red circle", "a star on blue", "an orange square at the center", ..."""
    u = rng.random(8)
    if u[0] < P_COLOUR_ONLY:
        return str(scene.colour)
    words: list[str] = []
    if u[1] < P_SIZE:
        words.append(str(scene.size))
    if u[2] < P_COLOUR:
        words.append(str(scene.colour))
    words.append(str(scene.shape))
    noun_phrase = " ".join(words)
    if u[3] < P_ARTICLE:
        noun_phrase = f"{article(noun_phrase)} {noun_phrase}"
    parts = [noun_phrase]
    tails: list[str] = []
    if u[4] < P_BACKGROUND:
        background = str(scene.background)
        tails.append(_pick(rng, _BACKGROUND_FORMS).format(a=article(background), c=background))
    if u[5] < P_POSITION:
        form = _pick(rng, _POSITION_FORMS[scene.position])
        tails.append(form.format(scene.position) if "{}" in form else form)
    if len(tails) == 2 and u[6] < 0.5:
        tails.reverse()
    parts.extend(tails)
    return " ".join(parts)


def describe(
    scene: Scene, *, colour: bool = True, background: bool = False, size: bool = False, position: bool = False
) -> str:
    """The canonical caption naming the chosen attributes, e.g. "a small red circle on a blue background in
    the top left". Always names the shape. For prompts whose meaning must be unambiguous (evaluation, tests)."""
    words = [str(scene.size)] if size else []
    words += [str(scene.colour)] if colour else []
    words.append(str(scene.shape))
    text = " ".join(words)
    text = f"{article(text)} {text}"
    if background:
        text += f" on {article(scene.background)} {scene.background} background"
    if position:
        text += " in the centre" if scene.position == Position.CENTRE else f" in the {scene.position}"
    return text


# --- prompt parsing -----------------------------------------------------------------------------------

_COLOUR_RE = "|".join(c.value for c in Colour)
_BACKGROUND_RES = (
    re.compile(rf"\b(?:on|with)\s+(?:an?\s+)?({_COLOUR_RE})\b(?:\s+(?:background|backdrop))?"),
    re.compile(rf"\b({_COLOUR_RE})\s+(?:background|backdrop)\b"),
)
_POSITION_RE = re.compile(r"\b(top|bottom)[\s-]+(left|right)\b|\b(centre|center|middle)\b")
_WORD_RE = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a caption or prompt names, e.g. "a red star on blue" ->
    {"colour": "red", "shape": "star", "background": "blue"}. Keys are Scene field names; values are the
    canonical words ("center"/"middle" -> "centre"). Unnamed attributes are absent."""
    text = prompt.lower()
    found: dict[str, str] = {}
    for pattern in _BACKGROUND_RES:
        match = pattern.search(text)
        if match:
            found["background"] = match.group(1)
            text = text[: match.start()] + " " + text[match.end() :]
            break
    match = _POSITION_RE.search(text)
    if match:
        found["position"] = f"{match.group(1)} {match.group(2)}" if match.group(1) else "centre"
        text = text[: match.start()] + " " + text[match.end() :]
    words = _WORD_RE.findall(text)
    for attribute, vocabulary in (("colour", Colour), ("shape", Shape), ("size", Size)):
        for word in words:
            if word in {member.value for member in vocabulary}:
                found[attribute] = word
                break
    return found


# --- batches ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [n, H, W, 3]
    captions: list[str]
    scenes: list[Scene]


def sample_batch(n: int, size_px: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` random scenes, drawn, with one random caption each: (uint8 [n, H, W, 3], captions, scenes)."""
    images = np.empty((n, size_px, size_px, 3), dtype=np.uint8)
    captions: list[str] = []
    scenes: list[Scene] = []
    for i in range(n):
        scene = random_scene(rng)
        images[i] = render(scene, size_px, rng)
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes


def iterate_batches(batch_size: int, size_px: int, seed: int, start: int = 0) -> Iterator[Batch]:
    """Endless batches; batch k depends only on (seed, k), so training can resume at any `start`."""
    k = start
    while True:
        images, captions, scenes = sample_batch(batch_size, size_px, np.random.default_rng([seed, k]))
        yield Batch(images=images, captions=captions, scenes=scenes)
        k += 1
