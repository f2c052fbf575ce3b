import numpy as np
import pytest
from PIL import Image

from sdserver.demo import classifier
from sdserver.demo.classifier import CLEAN, DEGRADED, Degradation, classify, degrade, validate
from sdserver.demo.dataset import (
    PALETTE,
    Colour,
    Position,
    Scene,
    Shape,
    Size,
    coverage,
    draw_layout,
    render,
    render_layout,
)
from sdserver.errors import InvalidImage


def test_clean_renders_are_read_perfectly_at_64_px():
    accuracy = validate(100, 64, seed=11)
    assert all(value >= 0.99 for value in accuracy.values()), accuracy


def test_clean_renders_are_read_perfectly_at_128_px():
    accuracy = validate(25, 128, seed=12)
    assert all(value >= 0.99 for value in accuracy.values()), accuracy


def test_degraded_renders_are_still_read():
    # Measured over 1000 images at 64 px: colour, background 1.000, size, position 0.999, shape 0.988
    # (128 px: 500 images, shape 0.998, the rest 1.000). The floors leave room for sampling error at n=120.
    accuracy = validate(120, 64, seed=13, degradation=DEGRADED)
    assert accuracy["colour"] >= 0.98 and accuracy["background"] >= 0.98, accuracy
    assert accuracy["size"] >= 0.97 and accuracy["position"] >= 0.97, accuracy
    assert accuracy["shape"] >= 0.95, accuracy


def test_a_known_scene_is_read_back():
    scene = Scene(Shape.TRIANGLE, Colour.ORANGE, Colour.YELLOW, Size.SMALL, Position.BOTTOM_LEFT)
    image = render(scene, 96, np.random.default_rng(0))
    prediction = classify(Image.fromarray(image))  # PIL input too
    assert prediction.attributes() == scene.attributes()
    assert prediction.has_foreground and prediction.shape_iou > 0.9 and prediction.shape_margin > 0.05
    assert prediction.centroid[0] < 0.5 < prediction.centroid[1]


def test_a_blank_image_has_no_foreground():
    image = np.full((64, 64, 3), PALETTE[Colour.GREEN], dtype=np.uint8)
    noisy = degrade(image, Degradation(noise=12.0, colour_shift=20.0), np.random.default_rng(0))
    prediction = classify(noisy)
    assert not prediction.has_foreground
    assert prediction.background == "green"
    assert prediction.attributes() == {"background": "green"}


def test_foreground_colour_never_snaps_to_the_background():
    # A shape whose colour is nearest to the background's own palette entry: the dataset never draws a
    # shape in its background colour, so the next nearest palette colour is the reading.
    drawn = (0, 130, 225)
    image = np.full((64, 64, 3), PALETTE[Colour.BLUE], dtype=np.uint8)
    image[20:44, 20:44] = drawn
    assert classifier.nearest_colour(np.array(drawn)) == Colour.BLUE
    expected = classifier.nearest_colour(np.array(drawn), exclude=Colour.BLUE)
    assert expected != Colour.BLUE
    assert classify(image).colour == expected


def test_rejects_images_it_cannot_read():
    with pytest.raises(InvalidImage):
        classify(np.zeros((64, 48, 3), dtype=np.uint8))
    with pytest.raises(InvalidImage):
        classify(np.zeros((64, 64), dtype=np.uint8))


def test_degrade_is_deterministic_and_does_damage():
    image = render(Scene(Shape.STAR, Colour.RED, Colour.WHITE, Size.LARGE, Position.CENTRE), 64,
                   np.random.default_rng(0))
    a = degrade(image, DEGRADED, np.random.default_rng(1))
    b = degrade(image, DEGRADED, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert np.array_equal(degrade(image, CLEAN, np.random.default_rng(1)), image)
    assert np.abs(a.astype(int) - image).mean() > 5


def test_colour_noise_is_unreadable_not_a_shape():
    # What an untrained model draws: blotchy colour noise. It must score as a failure for every attribute,
    # not as whatever colour the noise leans to.
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((64, 64), Image.BILINEAR))
    prediction = classify(image)
    assert not prediction.readable and not prediction.has_foreground
    assert prediction.attributes() == {}
    assert prediction.residual > 45


def test_renders_fit_the_two_colour_picture():
    scene = Scene(Shape.STAR, Colour.RED, Colour.WHITE, Size.LARGE, Position.CENTRE)
    image = render(scene, 64, np.random.default_rng(0))
    assert classify(image).residual < 1.0
    assert classify(degrade(image, DEGRADED, np.random.default_rng(0))).readable
    assert classify(degrade(image, classifier.HEAVY, np.random.default_rng(0))).readable


def test_shape_mask_matches_the_drawn_shape():
    scene = Scene(Shape.SQUARE, Colour.GREEN, Colour.PURPLE, Size.LARGE, Position.TOP_LEFT)
    layout = draw_layout(scene, np.random.default_rng(0))
    truth = coverage(scene.shape, layout, 64) > 0.5
    mask = classifier.shape_mask(degrade(render_layout(scene, layout, 64), DEGRADED, np.random.default_rng(0)))
    assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert not classifier.shape_mask(blank).any()
