import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from sdserver.demo import evaluate
from sdserver.demo.classifier import Prediction, find_foreground, to_array
from sdserver.demo.dataset import PALETTE, Colour, parse_prompt, random_scene, render
from sdserver.demo.evaluate import (
    EvalConfig,
    Rate,
    adherence,
    breakdown,
    colour_rate,
    mask_iou,
    recolour_summary,
)


def prediction(colour=None, shape=None, background="white", size=None, position=None):
    drawn = colour is not None
    return Prediction(background, colour, shape, size, position, has_foreground=drawn)


def test_adherence_counts_only_prompts_that_name_the_attribute():
    results = [
        ({"colour": "red", "shape": "circle"}, prediction("red", "circle", size="large")),
        ({"colour": "blue", "shape": "star", "size": "small"}, prediction("red", "star", size="small")),
        ({"colour": "green", "shape": "square", "background": "white"}, prediction()),  # nothing drawn
    ]
    rates = adherence(results)
    assert rates["colour"] == Rate(1, 3)
    assert rates["shape"] == Rate(2, 3)
    assert rates["size"] == Rate(1, 1)
    assert rates["background"] == Rate(1, 1)  # the background is there even without a shape
    assert rates["position"] == Rate(0, 0) and rates["position"].value is None


def test_breakdown_splits_by_the_value_asked_for():
    results = [
        ({"colour": "red", "shape": "star"}, prediction("red", "circle")),
        ({"colour": "red", "shape": "star"}, prediction("red", "star")),
        ({"colour": "blue", "shape": "circle"}, prediction("blue", "circle")),
    ]
    assert breakdown(results, "shape") == {"circle": Rate(1, 1), "star": Rate(1, 2)}
    assert breakdown(results, "colour") == {"blue": Rate(1, 1), "red": Rate(2, 2)}


def test_colour_rate_and_missing_shapes():
    predictions = [prediction("red", "star"), prediction("blue", "star"), prediction(), prediction("red", "circle")]
    assert colour_rate(predictions, "red") == Rate(2, 4)
    assert colour_rate(predictions, "red").value == 0.5
    assert colour_rate([], "red").value is None


def test_mask_iou():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    assert mask_iou(a, b) == 1.0
    a[:2] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == 0.0
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


def test_recolour_summary():
    outcomes = [(prediction("blue", "circle"), 0.9), (prediction("red", "circle"), 0.7), (prediction(), 0.0)]
    summary = recolour_summary("blue", outcomes, baseline_ious=[0.1, 0.3])
    assert summary.recoloured == Rate(1, 3)
    assert summary.mean_iou == pytest.approx(1.6 / 3)
    assert summary.baseline_iou == pytest.approx(0.2)


# --- the whole evaluation against fake generators -----------------------------------------------------


def faithful_txt2img(prompt, negative_prompt, seed, width, height, steps, cfg, sampler):
    """Draws exactly what the prompt names (the rest at random), never the negative prompt's colour."""
    rng = np.random.default_rng(seed)
    named = parse_prompt(prompt)
    banned = parse_prompt(negative_prompt).get("colour")
    while True:
        scene = random_scene(rng)
        scene = dataclasses.replace(scene, **{k: type(getattr(scene, k))(v) for k, v in named.items()})
        if scene.colour != scene.background and scene.colour != banned:
            return Image.fromarray(render(scene, width, rng))


def recolouring_img2img(init_image, prompt, negative_prompt, seed, width, height, steps, cfg, sampler, strength):
    """Keeps the init image's layout and background, repaints the shape in the prompt's colour (if any)."""
    named = parse_prompt(prompt).get("colour")
    if named is None:
        return init_image
    found = find_foreground(to_array(init_image))
    target = np.asarray(PALETTE[Colour(named)], dtype=np.float32)
    out = found.bg_rgb + found.alpha[..., None] * (target - found.bg_rgb)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


SMALL = EvalConfig(n=24, size=64, n_negative=24, n_recolour=6, n_validate=9)


def test_a_faithful_model_scores_full_marks():
    report = evaluate.evaluate(SMALL, faithful_txt2img, recolouring_img2img)
    for attribute, rate in report.adherence.items():
        assert rate.total > 0 and rate.value >= 0.95, (attribute, rate)
    assert report.negative_with.value == 0.0
    assert report.negative_without.value > 0.0  # red comes up by chance without the negative
    assert report.recolour.recoloured.value == 1.0
    assert report.recolour.mean_iou > 0.9
    assert report.recolour.baseline_iou < report.recolour.mean_iou
    assert report.classifier_roundtrip == {a: 1.0 for a in report.adherence}  # its round trip is exact
    text = evaluate.format_report(report)
    assert "colour" in text and "negative prompt 'red'" in text and "recoloured 1.000" in text
    figures = json.loads(json.dumps(report.as_json()))
    assert figures["negative"]["with"] == {"rate": 0.0, "n": 24}


def test_a_model_that_ignores_prompts_scores_low():
    def stubborn(prompt, negative_prompt, seed, **_):
        image = np.full((64, 64, 3), PALETTE[Colour.WHITE], dtype=np.uint8)
        image[16:48, 16:48] = PALETTE[Colour.BLACK]
        return Image.fromarray(image)

    report = evaluate.evaluate(SMALL, stubborn, None)
    assert report.adherence["colour"].value < 0.2 and report.adherence["shape"].value < 0.4
    assert report.negative_with.value == 0.0 and report.negative_without.value == 0.0
    assert report.recolour is None and "no img2img" in report.recolour_error
    assert report.classifier_roundtrip is None
    assert "not measured" in evaluate.format_report(report)


def test_failed_img2img_is_reported_not_raised():
    def failing(**_):
        raise evaluate.GenerationFailed("/sdapi/v1/img2img answered 422: init_images is not supported")

    report = evaluate.evaluate(dataclasses.replace(SMALL, n=4, n_negative=2), faithful_txt2img, failing)
    assert report.recolour is None and "422" in report.recolour_error


def test_command_line_defaults_match_the_issue():
    config, checkpoint, threads, grid_path = evaluate.parse_args([])
    assert (config.n, config.steps, config.cfg, config.sampler, config.size) == (200, 20, 7.0, "Euler a", 128)
    assert checkpoint is None and threads >= 1 and grid_path is None
    config, checkpoint, _, _ = evaluate.parse_args(["--checkpoint", "x.safetensors", "--n", "50", "--size", "64"])
    assert (config.n, config.size, checkpoint) == (50, 64, "x.safetensors")


def test_sink_sees_every_adherence_picture_and_grid_tiles_them():
    seen = []
    config = dataclasses.replace(SMALL, n=10, n_negative=2)
    evaluate.evaluate(config, faithful_txt2img, None, sink=lambda case, image: seen.append((case, image)))
    assert [case.prompt for case, _ in seen] == [c.prompt for c in evaluate.adherence_cases(10, config.seed)]
    sheet = evaluate.grid([image for _, image in seen], columns=4)
    assert sheet.size == (4 * 64, 3 * 64)
    assert sheet.getpixel((64 + 1, 1)) == seen[1][1].getpixel((1, 1))


def test_noise_pictures_fail_every_attribute():
    def noise(prompt, negative_prompt, seed, width, **_):
        coarse = np.random.default_rng(seed).integers(0, 256, size=(width // 4, width // 4, 3)).astype(np.uint8)
        return Image.fromarray(coarse).resize((width, width), Image.BILINEAR)

    report = evaluate.evaluate(dataclasses.replace(SMALL, n=10, n_negative=4), noise, None)
    assert all(rate.hits == 0 for rate in report.adherence.values())
    assert report.unreadable == Rate(10, 10) and report.no_foreground == Rate(10, 10)
