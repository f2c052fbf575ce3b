"""txt2img through the real loader, conditioning, sampler and VAE on a tiny random checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.models.manager import load_checkpoint
from sdserver.pipeline.txt2img import plan_batches, txt2img


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cpu"))


def request(**kw) -> GenerationRequest:  # type: ignore[no-untyped-def]
    base = GenerationRequest(
        prompt="a red circle", negative_prompt="", width=64, height=48,
        sampling=SamplingParams(sampler="euler_a", scheduler="automatic", steps=4, cfg_scale=7.0),
        seeds=SeedParams(seed=1234),
    )
    return replace(base, **kw)


def pixels(result) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return [np.asarray(g.image) for g in result]


def test_images_have_the_requested_size_and_seeds(model, control) -> None:  # type: ignore[no-untyped-def]
    images, interrupted = txt2img(model, request(batch_size=2, n_iter=2), control)
    assert not interrupted
    assert [g.seed for g in images] == [1234, 1235, 1236, 1237]
    assert all(g.image.size == (64, 48) for g in images)
    assert control.passes == [(0, 2, 4), (1, 2, 4)]
    assert control.steps == [0, 1, 2, 3, 0, 1, 2, 3]


def test_same_request_twice_is_identical(model, control) -> None:  # type: ignore[no-untyped-def]
    a, _ = txt2img(model, request(), control)
    b, _ = txt2img(model, request(), control)
    assert np.array_equal(pixels(a)[0], pixels(b)[0])


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpmpp_2m", "dpmpp_2m_sde"])
def test_batch_of_two_equals_two_singles(model, control, sampler) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(sampler=sampler, scheduler="karras", steps=4, cfg_scale=5.0)
    batch, _ = txt2img(model, request(batch_size=2, sampling=params), control)
    one, _ = txt2img(model, request(sampling=params), control)
    two, _ = txt2img(model, request(sampling=params, seeds=SeedParams(seed=1235)), control)
    assert np.abs(pixels(batch)[0].astype(int) - pixels(one)[0]).max() <= 1
    assert np.abs(pixels(batch)[1].astype(int) - pixels(two)[0]).max() <= 1


def test_prompt_negative_prompt_and_clip_skip_each_change_the_image(model, control) -> None:  # type: ignore[no-untyped-def]
    base = pixels(txt2img(model, request(), control)[0])[0]
    for change in ({"prompt": "a blue square"}, {"negative_prompt": "green"}, {"clip_skip": 2}):
        other = pixels(txt2img(model, request(**change), control)[0])[0]
        assert not np.array_equal(base, other), change


def test_interrupt_returns_the_images_so_far(model, control) -> None:  # type: ignore[no-untyped-def]
    control.interrupt_at = 1
    images, interrupted = txt2img(model, request(n_iter=3), control)
    assert interrupted
    assert len(images) == 1
    assert control.steps == [0, 1]


def test_skip_moves_on_to_the_next_batch(model, control) -> None:  # type: ignore[no-untyped-def]
    control.skip_at = (0, 1)
    images, interrupted = txt2img(model, request(n_iter=2), control)
    assert not interrupted
    assert len(images) == 2
    assert control.steps == [0, 1, 0, 1, 2, 3]


def test_previews_are_made_only_when_asked(model, control) -> None:  # type: ignore[no-untyped-def]
    control.preview_every = 2
    txt2img(model, request(), control)
    assert len(control.previews) == 2
    assert control.previews[0].size == (64 // 8, 48 // 8)
    control.previews.clear()
    txt2img(model, request(preview_method="Full"), control)
    assert control.previews[0].size == (64, 48)


def test_variation_seed_keeps_the_main_seed_and_changes_the_image(model, control) -> None:  # type: ignore[no-untyped-def]
    plain = txt2img(model, request(batch_size=2), control)[0]
    varied = txt2img(model, request(batch_size=2, seeds=SeedParams(seed=1234, subseed=99, subseed_strength=0.5)), control)[0]
    assert [g.seed for g in varied] == [1234, 1234]
    assert [g.subseed for g in varied] == [99, 100]
    assert not np.array_equal(pixels(plain)[0], pixels(varied)[0])


def test_plan_batches_follows_a1111_seed_rules() -> None:
    plan = plan_batches(request(batch_size=2, n_iter=2, seeds=SeedParams(seed=500, subseed=7)))
    assert plan.seeds == (500, 501, 502, 503)
    assert plan.subseeds == (7, 8, 9, 10)
    assert plan.batch(1) == slice(2, 4)
