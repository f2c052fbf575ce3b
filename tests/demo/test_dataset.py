import itertools
import math

import numpy as np
import pytest

from sdserver.demo import dataset
from sdserver.demo.dataset import (
    PALETTE,
    SHAPE_GEOMETRY,
    Colour,
    Layout,
    Position,
    Scene,
    Shape,
    Size,
    caption,
    coverage,
    parse_prompt,
    random_scene,
    render,
    render_layout,
    sample_batch,
)


def test_sample_batch_is_deterministic_given_the_seed():
    a = sample_batch(16, 64, np.random.default_rng(7))
    b = sample_batch(16, 64, np.random.default_rng(7))
    c = sample_batch(16, 64, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (16, 64, 64, 3) and a[0].dtype == np.uint8
    assert len(a[1]) == len(a[2]) == 16


def test_iterate_batches_resumes_at_any_batch():
    from_start = dataset.iterate_batches(4, 32, seed=3)
    batches = [next(from_start) for _ in range(3)]
    resumed = next(dataset.iterate_batches(4, 32, seed=3, start=2))
    assert np.array_equal(resumed.images, batches[2].images)
    assert resumed.captions == batches[2].captions
    assert not np.array_equal(batches[0].images, batches[1].images)


@pytest.mark.parametrize("shape", list(Shape))
def test_coverage_area_matches_the_shape_geometry(shape):
    # Catches an inside-out or mis-scaled distance function: the anti-aliased area is the analytic one.
    layout = Layout(cx=0.5, cy=0.5, radius=0.24, rotation=0.1)
    measured = coverage(shape, layout, 128).sum() / 128**2
    expected = SHAPE_GEOMETRY[shape].area * layout.radius**2
    assert measured == pytest.approx(expected, rel=0.02)


def test_shapes_are_distinct_at_the_same_place_and_area():
    masks = {}
    for shape, geometry in SHAPE_GEOMETRY.items():
        radius = math.sqrt(0.08 / geometry.area)  # equal areas, so only the outline differs
        masks[shape] = coverage(shape, Layout(0.5, 0.5, radius, 0.0), 64)
    for a, b in itertools.combinations(Shape, 2):
        iou = np.minimum(masks[a], masks[b]).sum() / np.maximum(masks[a], masks[b]).sum()
        assert iou < 0.9, (a, b, iou)


def test_square_sides_are_axis_aligned():
    mask = coverage(Shape.SQUARE, Layout(0.5, 0.5, 0.2, 0.0), 64) > 0.5
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # An axis-aligned square fills its bounding box; a diamond fills half of it.
    assert mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) > 0.9


def test_triangle_and_star_point_up():
    for shape in (Shape.TRIANGLE, Shape.STAR):
        mask = coverage(shape, Layout(0.5, 0.5, 0.2, 0.0), 64) > 0.5
        rows = np.flatnonzero(mask.any(axis=1))
        top, bottom = mask[rows[0]].sum(), mask[rows[-1]].sum()
        assert top < bottom, shape  # a tip at the top, a base (or two tips) at the bottom


@pytest.mark.parametrize("shape", list(Shape))
@pytest.mark.parametrize("colour", list(Colour))
def test_each_shape_and_colour_renders_its_colours(shape, colour):
    background = Colour.BLACK if colour != Colour.BLACK else Colour.WHITE
    scene = Scene(shape, colour, background, Size.LARGE, Position.CENTRE)
    image = render(scene, 64, np.random.default_rng(0)).reshape(-1, 3)
    pixels, counts = np.unique(image, axis=0, return_counts=True)
    ranked = [tuple(int(v) for v in pixels[i]) for i in np.argsort(counts)[::-1]]
    assert ranked[0] == PALETTE[background]
    assert ranked[1] == PALETTE[colour]


def test_random_scenes_cover_every_value_and_never_hide_the_shape():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    assert all(s.colour != s.background for s in scenes)
    for field, values in (("shape", Shape), ("colour", Colour), ("background", Colour), ("size", Size),
                          ("position", Position)):
        assert {getattr(s, field) for s in scenes} == set(values), field


@pytest.mark.parametrize("size", list(Size))
@pytest.mark.parametrize("position", list(Position))
def test_shapes_stay_inside_the_image_at_the_extreme_jitter(size, position):
    # The border is what the classifier reads the background from.
    for shape, jitter in itertools.product(Shape, itertools.product((-1.0, 1.0), repeat=2)):
        ax, ay = dataset.anchor(size, position)
        layout = Layout(
            cx=ax + dataset.POSITION_JITTER * jitter[0],
            cy=ay + dataset.POSITION_JITTER * jitter[1],
            radius=dataset.SIZE_RADIUS[size] * (1 + dataset.SCALE_JITTER),
            rotation=math.radians(dataset.ROTATION_JITTER_DEG[shape]),
        )
        alpha = coverage(shape, layout, 64)
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert border.max() < 0.5, (shape, jitter)


def test_positions_are_separated_by_more_than_the_jitter():
    for size in Size:
        anchors = [dataset.anchor(size, p) for p in Position]
        closest = min(math.dist(a, b) for a, b in itertools.combinations(anchors, 2))
        assert closest > 4 * dataset.POSITION_JITTER * math.sqrt(2)


def test_render_layout_is_render_with_the_drawn_layout():
    scene = Scene(Shape.STAR, Colour.ORANGE, Colour.BLUE, Size.SMALL, Position.TOP_RIGHT)
    layout = dataset.draw_layout(scene, np.random.default_rng(5))
    assert np.array_equal(render(scene, 48, np.random.default_rng(5)), render_layout(scene, layout, 48))


def test_captions_name_only_true_attributes_and_vary():
    rng = np.random.default_rng(1)
    named: dict[str, int] = {}
    texts = set()
    for _ in range(3000):
        scene = random_scene(rng)
        text = caption(scene, rng)
        parsed = parse_prompt(text)
        assert parsed.items() <= scene.attributes().items(), (text, scene)
        assert "shape" in parsed or "colour" in parsed, text
        for key in parsed:
            named[key] = named.get(key, 0) + 1
        texts.add(text)
    # Every optional attribute is sometimes named and sometimes left out.
    for key in ("colour", "background", "size", "position"):
        assert 0.2 * 3000 < named[key] < 0.95 * 3000, (key, named[key])
    joined = "\n".join(texts)
    for phrase in ("center", "centre", "an orange", "top left", "bottom right corner", "background"):
        assert phrase in joined
    assert " a orange" not in joined
    assert len(texts) > 1000


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle on a blue background", {"colour": "red", "shape": "circle", "background": "blue"}),
        ("red circle", {"colour": "red", "shape": "circle"}),
        ("a red star on blue", {"colour": "red", "shape": "star", "background": "blue"}),
        ("a circle on a red background", {"shape": "circle", "background": "red"}),
        ("large white square, black background", {"size": "large", "colour": "white", "shape": "square",
                                                  "background": "black"}),
        ("a small green triangle in the top left", {"size": "small", "colour": "green", "shape": "triangle",
                                                     "position": "top left"}),
        ("a star at the center", {"shape": "star", "position": "centre"}),
        ("A Purple Star In The Middle", {"colour": "purple", "shape": "star", "position": "centre"}),
        ("an orange square in the bottom-right corner with a yellow backdrop",
         {"colour": "orange", "shape": "square", "position": "bottom right", "background": "yellow"}),
        ("red", {"colour": "red"}),
        ("a cat", {}),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_coverage_window_is_a_crop_of_the_whole():
    layout = Layout(0.4, 0.6, 0.2, 0.1)
    window = (slice(10, 50), slice(5, 30))
    assert np.array_equal(coverage(Shape.STAR, layout, 64, window), coverage(Shape.STAR, layout, 64)[window])


def test_describe_names_exactly_what_it_is_asked_to():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = random_scene(rng)
        full = dataset.describe(scene, background=True, size=True, position=True)
        assert parse_prompt(full) == scene.attributes(), full
        assert parse_prompt(dataset.describe(scene)) == {"colour": str(scene.colour), "shape": str(scene.shape)}
        assert parse_prompt(dataset.describe(scene, colour=False)) == {"shape": str(scene.shape)}
    orange = Scene(Shape.SQUARE, Colour.ORANGE, Colour.ORANGE, Size.LARGE, Position.CENTRE)
    assert dataset.describe(orange, background=True) == "an orange square on an orange background"
