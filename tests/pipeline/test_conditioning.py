"""Prompt text → conditioning with the real tokenizer and a tiny text encoder."""

from __future__ import annotations

import pytest
import torch

from sdserver.models.manager import load_checkpoint
from sdserver.pipeline.conditioning import ConditioningOptions, TextEncoderCache, condition_prompt


@pytest.fixture(scope="module")
def model(tiny_checkpoint):  # type: ignore[no-untyped-def]
    return load_checkpoint(tiny_checkpoint, torch.float32, torch.device("cpu"))


def cache(model, **options) -> TextEncoderCache:  # type: ignore[no-untyped-def]
    return TextEncoderCache(model, ConditioningOptions(**options))


def test_prompt_editing_switches_conditioning_at_the_given_step(model) -> None:  # type: ignore[no-untyped-def]
    cond = condition_prompt(cache(model), "a [red:blue:5] circle", 10).parts[0]
    assert [end for end, _ in cond.entries] == [5, 10]
    assert torch.equal(cond.at(0).context, cond.at(5).context)
    assert not torch.equal(cond.at(5).context, cond.at(6).context)


def test_long_prompts_concatenate_77_token_chunks(model) -> None:  # type: ignore[no-untyped-def]
    short = condition_prompt(cache(model), "cat", 4).parts[0].at(0).context
    long = condition_prompt(cache(model), ", ".join(["cat"] * 60), 4).parts[0].at(0).context
    broken = condition_prompt(cache(model), "cat BREAK dog", 4).parts[0].at(0).context
    assert short.shape[0] == 77 and long.shape[0] == 154 and broken.shape[0] == 154


def test_emphasis_changes_the_conditioning_unless_ignored(model) -> None:  # type: ignore[no-untyped-def]
    plain = condition_prompt(cache(model), "a red circle", 4).parts[0].at(0).context
    weighted = condition_prompt(cache(model), "a (red:1.5) circle", 4).parts[0].at(0).context
    ignored = condition_prompt(cache(model, emphasis="Ignore"), "a (red:1.5) circle", 4).parts[0].at(0).context
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain, ignored)
    # "Original" rescales to restore the mean (its math is tested in test_emphasis); "No norm" does not.
    no_norm = condition_prompt(cache(model, emphasis="No norm"), "a (red:1.5) circle", 4).parts[0].at(0).context
    assert not torch.allclose(weighted, no_norm)


def test_and_prompts_become_weighted_parts(model) -> None:  # type: ignore[no-untyped-def]
    cond = condition_prompt(cache(model), "a red circle :1.2 AND a blue square", 4)
    assert [p.weight for p in cond.parts] == [1.2, 1.0]
    negative = condition_prompt(cache(model), "a AND b", 4, allow_and=False)
    assert len(negative.parts) == 1


def test_each_distinct_prompt_is_encoded_once(model) -> None:  # type: ignore[no-untyped-def]
    memo = cache(model)
    for _ in range(3):
        condition_prompt(memo, "a red circle", 4)
    condition_prompt(memo, "a blue circle", 4)
    assert len(memo.encoded) == 2
