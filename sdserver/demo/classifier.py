"""A pixel-heuristic judge of demo-model images: which shape, colours, size and position did it draw?

No learning: the image is modelled as the dataset draws it, `pixel = bg + alpha * (fg - bg)`.

1. Background: the palette colour most border pixels snap to; its measured value is their median.
2. Foreground colour: the median of the pixels farthest from the background, snapped to the palette
   (never to the background's own colour: the dataset never draws a shape in its background colour).
3. Alpha: each pixel's projection onto the line bg -> fg, with isolated noise pixels dropped. Its sum (area)
   and centre of mass survive blur, which is why size and position stay right on blurry model outputs.
4. Shape: the best soft IoU between alpha and each shape's template drawn at the measured centroid and
   area, over the rotations the dataset uses and over a range of blurs (the blur is searched, not measured).
5. Size from the area (per shape), position from the nearest anchor (per size).
6. A picture too far from any two-colour picture (colour noise, a mess) is `readable=False`: no attributes.

`validate` measures all this against the dataset's own ground truth, clean or degraded by blur, noise,
blotches and a colour shift like a small VAE's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from sdserver.demo.dataset import (
    PALETTE,
    ROTATION_JITTER_DEG,
    SHAPE_GEOMETRY,
    SIZE_RADIUS,
    Colour,
    Layout,
    Position,
    Shape,
    Size,
    anchor,
    coverage,
    random_scene,
    render,
)
from sdserver.errors import InvalidImage

ATTRIBUTES = ("colour", "shape", "background", "size", "position")

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)

# A pixel is a foreground candidate when it is farther from the background than half the distance from the
# background to the nearest other palette colour: noise rarely gets there, any real shape colour does.
_CANDIDATE_FRACTION = 0.5
# Fewer candidate pixels than this (fraction of the image) means nothing was drawn. The smallest shape the
# dataset draws covers about 2% of the image.
_MIN_FOREGROUND = 0.004
_ROTATION_STEPS = 5  # template rotations tried per shape, spread over the dataset's jitter range
# Blurs (pixels at 64 px) tried per template: sharp renders up to a heavily blurred decoder output.
_BLUR_STEPS = (0.0, 0.75, 1.5, 2.25, 3.0)
# Isolated noise pixels are dropped: the foreground is where alpha, smoothed this much (pixels at 64 px),
# is above _SUPPORT_LEVEL.
_SUPPORT_SIGMA = 1.0
_SUPPORT_LEVEL = 0.15
_CORE_QUANTILE = 0.8  # the farthest fifth of the candidate pixels gives the foreground colour
# Pictures further than this (RMS, 0..255) from the two-colour picture read off them are not a shape on a
# background: measured 0.1 on clean renders, at most 22 on DEGRADED and 37 on HEAVY ones, 50-57 on the
# colour noise an untrained model draws.
_MAX_RESIDUAL = 45.0


@dataclass(frozen=True)
class Prediction:
    """What the classifier sees. Attributes are canonical words; the shape's are None when there is no
    foreground, and all are None when the picture is not a shape on a background at all (`readable`)."""

    background: str | None
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    has_foreground: bool
    shape_iou: float = 0.0  # soft IoU of the best template: near 1 for a clean render, low for a blob
    shape_margin: float = 0.0  # best IoU minus the runner-up's: how sure the shape call is
    area: float = 0.0  # foreground area, fraction of the image
    centroid: tuple[float, float] = (0.5, 0.5)  # (x, y) in image widths
    residual: float = 0.0  # RMS distance (0..255) of the pixels from the two-colour picture read off them
    readable: bool = True

    def attributes(self) -> dict[str, str]:
        values = {a: getattr(self, a) for a in ATTRIBUTES}
        return {k: v for k, v in values.items() if v is not None}


def to_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """An RGB image as float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 8:
        raise InvalidImage(f"expected an RGB image [H, W, 3] of at least 8x8, got shape {array.shape}", field="image")
    return array.astype(np.float32)


def nearest_colour(rgb: np.ndarray, exclude: Colour | None = None) -> Colour:
    """The palette colour nearest to `rgb`, optionally never `exclude`."""
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    if exclude is not None:
        distances[_PALETTE_NAMES.index(exclude)] = np.inf
    return _PALETTE_NAMES[int(np.argmin(distances))]


def _border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def background_colour(array: np.ndarray) -> tuple[Colour, np.ndarray]:
    """The palette name most border pixels snap to, and the median measured value of those pixels."""
    border = _border(array)
    snapped = np.argmin(np.linalg.norm(border[:, None, :] - _PALETTE_RGB[None], axis=2), axis=1)
    mode = int(np.bincount(snapped, minlength=len(_PALETTE_NAMES)).argmax())
    return _PALETTE_NAMES[mode], np.median(border[snapped == mode], axis=0)


def _separation(colour: Colour) -> float:
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(PALETTE[colour], dtype=np.float32), axis=1)
    return float(np.sort(distances)[1])


def _gaussian_matrix(n: int, sigma_px: float) -> np.ndarray | None:
    """G with G @ X @ G.T = X blurred by a Gaussian of sigma_px (None: no blur). Two small matrix products
    are far cheaper than a convolution per template. Rows are renormalised where the kernel leaves the image,
    so a flat area stays flat up to the edge."""
    if sigma_px < 0.05:
        return None
    offsets = np.arange(n, dtype=np.float32)
    weights = np.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / sigma_px) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a [H, W] or [H, W, C] array, edges clamped (float32)."""
    image = image.astype(np.float32)
    rows, cols = _gaussian_matrix(image.shape[0], sigma_px), _gaussian_matrix(image.shape[1], sigma_px)
    if rows is None or cols is None:
        return image
    return np.einsum("ij,jk...,lk->il...", rows, image, cols, optimize=True).astype(np.float32)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union > 0 else 0.0


def _window(alpha: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The bounding box of alpha's support, grown by `margin` pixels and clipped to the image."""
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    height, width = alpha.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


def shape_scores(alpha: np.ndarray, centroid: tuple[float, float], area: float) -> dict[Shape, float]:
    """For each shape, the best soft IoU between `alpha` and that shape's template at the same centroid and
    area, over the dataset's rotation range and over how blurred the image may be (the blur is a nuisance
    we search over rather than measure: measuring it needs the shape)."""
    size_px = alpha.shape[0]
    sigmas = [s * size_px / 64 for s in _BLUR_STEPS]
    rows, cols = _window(alpha, int(math.ceil(3 * max(sigmas))) + 2)
    observed = alpha[rows, cols]
    blurs = [(_gaussian_matrix(observed.shape[0], s), _gaussian_matrix(observed.shape[1], s)) for s in sigmas]
    scores: dict[Shape, float] = {}
    for shape, geometry in SHAPE_GEOMETRY.items():
        radius = math.sqrt(area / geometry.area)
        max_rotation = math.radians(ROTATION_JITTER_DEG[shape])
        rotations = np.linspace(-max_rotation, max_rotation, _ROTATION_STEPS) if max_rotation else [0.0]
        best = 0.0
        for rotation in rotations:
            layout = Layout(cx=centroid[0], cy=centroid[1], radius=radius, rotation=float(rotation))
            template = coverage(shape, layout, size_px, (rows, cols))
            for blur_rows, blur_cols in blurs:
                blurred = template if blur_rows is None else blur_rows @ template @ blur_cols.T
                best = max(best, _soft_iou(observed, blurred))
        scores[shape] = best
    return scores


def size_of(shape: Shape, area: float) -> Size:
    """Small or large from the area, via the shape's own area per unit radius."""
    radius = math.sqrt(area / SHAPE_GEOMETRY[shape].area)
    threshold = math.sqrt(SIZE_RADIUS[Size.SMALL] * SIZE_RADIUS[Size.LARGE])  # geometric midpoint
    return Size.SMALL if radius < threshold else Size.LARGE


def position_of(size: Size, centroid: tuple[float, float]) -> Position:
    """The position whose anchor (for this size) is nearest the centroid."""
    return min(Position, key=lambda p: math.dist(anchor(size, p), centroid))


@dataclass(frozen=True)
class Foreground:
    """The image split into background and shape: measured colours and the shape's alpha [H, W]."""

    background: Colour
    bg_rgb: np.ndarray
    colour: Colour
    fg_rgb: np.ndarray
    axis: np.ndarray  # bg -> fg as alpha measures it: alpha 1 is bg_rgb + axis
    alpha: np.ndarray

    @property
    def area(self) -> float:
        return float(self.alpha.sum()) / self.alpha.size

    @property
    def centroid(self) -> tuple[float, float]:
        height, width = self.alpha.shape
        total = float(self.alpha.sum())
        xs = (np.arange(width, dtype=np.float32) + 0.5) / width
        ys = (np.arange(height, dtype=np.float32) + 0.5) / height
        return float(self.alpha.sum(axis=0) @ xs / total), float(self.alpha.sum(axis=1) @ ys / total)


def find_foreground(array: np.ndarray) -> Foreground | None:
    """Split a float RGB image into background and one foreground shape; None when nothing is drawn."""
    background, bg_rgb = background_colour(array)
    offset = array - bg_rgb
    distance = np.linalg.norm(offset, axis=2)
    candidates = distance > _CANDIDATE_FRACTION * _separation(background)
    if candidates.mean() < _MIN_FOREGROUND:
        return None
    # The farthest candidates are the shape's interior, clear of pixels blended with the background by the
    # edge or a blur (which would shrink the estimated contrast and so inflate alpha and the area).
    core = candidates & (distance >= np.quantile(distance[candidates], _CORE_QUANTILE))
    fg_rgb = np.median(array[core], axis=0)
    colour = nearest_colour(fg_rgb, exclude=background)
    # A blur wider than the shape's thinnest part leaves no pixel at the full foreground colour, which would
    # make alpha saturate early. So the alpha scale reaches at least as far as the palette colour (shifted
    # like the background was) along the measured direction; the direction stays measured, as a model's
    # colours need not lie on the palette.
    measured = fg_rgb - bg_rgb
    length = float(np.linalg.norm(measured))
    palette_fg = np.asarray(PALETTE[colour], dtype=np.float32) + (bg_rgb - np.asarray(PALETTE[background]))
    reach = max(length, float((palette_fg - bg_rgb) @ measured) / length)
    axis = measured * (reach / length)
    alpha = np.clip((offset @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0).astype(np.float32)
    support = _blur(alpha, _SUPPORT_SIGMA * array.shape[1] / 64) > _SUPPORT_LEVEL
    alpha = np.where(support, alpha, 0.0).astype(np.float32)
    if alpha.sum() < _MIN_FOREGROUND * alpha.size / 2:  # the candidates were scattered noise, not a shape
        return None
    return Foreground(background, bg_rgb, colour, fg_rgb, axis.astype(np.float32), alpha)


def residual(array: np.ndarray, bg_rgb: np.ndarray, axis: np.ndarray | None) -> float:
    """RMS distance of the pixels from the nearest mix of bg_rgb and bg_rgb + axis (or from bg_rgb alone)."""
    offset = array - bg_rgb
    if axis is None:
        model = np.zeros_like(offset)
    else:
        model = np.clip((offset @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)[..., None] * axis
    return float(np.sqrt(((offset - model) ** 2).sum(axis=-1).mean()))


def classify(image: np.ndarray | Image.Image) -> Prediction:
    """Read the attributes of a square demo image (uint8 [H, W, 3] array or PIL image)."""
    array = to_array(image)
    height, width = array.shape[:2]
    if height != width:
        raise InvalidImage(f"expected a square image, got {width}x{height}", field="image")
    found = find_foreground(array)
    if found is None:
        background, bg_rgb = background_colour(array)
        misfit = residual(array, bg_rgb, None)
        if misfit > _MAX_RESIDUAL:
            return Prediction(None, None, None, None, None, False, residual=misfit, readable=False)
        return Prediction(str(background), None, None, None, None, False, residual=misfit)
    misfit = residual(array, found.bg_rgb, found.axis)
    if misfit > _MAX_RESIDUAL:
        return Prediction(None, None, None, None, None, False, residual=misfit, readable=False)
    area, centroid = found.area, found.centroid
    scores = shape_scores(found.alpha, centroid, area)
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    shape = ranked[0][0]
    size = size_of(shape, area)
    return Prediction(
        background=str(found.background),
        colour=str(found.colour),
        shape=str(shape),
        size=str(size),
        position=str(position_of(size, centroid)),
        has_foreground=True,
        shape_iou=ranked[0][1],
        shape_margin=ranked[0][1] - ranked[1][1],
        area=area,
        centroid=centroid,
        residual=misfit,
    )


def shape_mask(image: np.ndarray | Image.Image) -> np.ndarray:
    """Where the shape is (alpha > 0.5), bool [H, W]; all False when there is none or the picture is
    unreadable."""
    array = to_array(image)
    found = find_foreground(array)
    if found is None or residual(array, found.bg_rgb, found.axis) > _MAX_RESIDUAL:
        return np.zeros(array.shape[:2], dtype=bool)
    return found.alpha > 0.5


# --- validation on ground truth -----------------------------------------------------------------------


@dataclass(frozen=True)
class Degradation:
    """Damage like a small VAE's and a half-trained model's: blur, blotchy low-frequency colour, per-pixel
    noise and a global colour shift. Blur is in pixels at 64 px and scales with the image."""

    blur_sigma: float = 0.0
    noise: float = 0.0  # std of Gaussian pixel noise, 0..255 units
    colour_shift: float = 0.0  # max absolute shift per channel, 0..255 units
    blotch: float = 0.0  # std of a smooth colour field varying over a quarter of the image, 0..255 units


CLEAN = Degradation()
# About what a small VAE's reconstructions look like: edges smeared over ~3 px at 64 px, visible grain,
# a colour cast, and uneven flat areas.
DEGRADED = Degradation(blur_sigma=1.2, noise=12.0, colour_shift=20.0, blotch=8.0)
# Worse than any usable model output: a small star's tips are gone and orange sits halfway to yellow.
HEAVY = Degradation(blur_sigma=2.0, noise=20.0, colour_shift=30.0, blotch=15.0)


def degrade(image: np.ndarray, degradation: Degradation, rng: np.random.Generator) -> np.ndarray:
    """The image blurred, shifted in colour, blotched and noised (uint8 in, uint8 out). Always draws the
    same random values, so a stream of renders stays aligned whatever the settings."""
    height, width = image.shape[:2]
    shift = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
    coarse = rng.normal(0.0, 1.0, size=(4, 4, 3)).astype(np.float32)
    noise = rng.normal(0.0, 1.0, size=image.shape).astype(np.float32)
    out = _blur(image.astype(np.float32), degradation.blur_sigma * width / 64)
    if degradation.blotch > 0:
        field = np.repeat(np.repeat(coarse, -(-height // 4), axis=0), -(-width // 4), axis=1)[:height, :width]
        field = _blur(field, width / 8)
        out = out + degradation.blotch * field / max(float(field.std()), 1e-6)
    out = out + degradation.colour_shift * shift + degradation.noise * noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def validate(
    n: int,
    size_px: int,
    seed: int,
    degradation: Degradation = CLEAN,
    classifier: Callable[[np.ndarray], Prediction] = classify,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """The classifier's accuracy per attribute on `n` random ground-truth renders, degraded, then passed
    through `transform` if given (e.g. a VAE round trip, to see what a model's decoder lets it draw)."""
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for _ in range(n):
        scene = random_scene(rng)
        image = degrade(render(scene, size_px, rng), degradation, rng)
        if transform is not None:
            image = transform(image)
        predicted = classifier(image).attributes()
        for attribute, truth in scene.attributes().items():
            hits[attribute] += predicted.get(attribute) == truth
    return {attribute: hits[attribute] / n for attribute in ATTRIBUTES}
