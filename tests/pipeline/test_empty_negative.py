"""SDXL-style models condition an all-empty negative prompt batch on zeros, as A1111 does (sgm's
force_zero_embeddings); SD 1.x encodes "" like any prompt."""

from __future__ import annotations


import pytest
import torch

from sdserver.models.manager import load_checkpoint
from sdserver.models.synthetic import random_state_dict, save_checkpoint, tiny_sd1_configs, tiny_sdxl_configs
from sdserver.pipeline.conditioning import ConditioningOptions, TextEncoderCache, is_empty_prompt
from sdserver.pipeline.txt2img import guidance_for


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("neg")
    xl = save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(), seed=1), folder / "xl.safetensors")
    sd1 = save_checkpoint(random_state_dict("sd1", tiny_sd1_configs(), seed=2), folder / "sd1.safetensors")
    return {name: load_checkpoint(path, torch.float32, "cpu") for name, path in (("sdxl", xl), ("sd1", sd1))}


def uncond_entry(model, negatives: tuple[str, ...]):  # type: ignore[no-untyped-def]
    cache = TextEncoderCache(model, ConditioningOptions())
    guidance = guidance_for(cache, ("a cat",) * len(negatives), negatives, 4, 7.0, 0.0)
    return [u.parts[0].entries[0][1] for u in guidance.unconds]


def test_sdxl_empty_negatives_are_zeros(models) -> None:  # type: ignore[no-untyped-def]
    for entry in uncond_entry(models["sdxl"], ("", "<lora:x:1>")):
        assert not entry.context.any() and not entry.pooled.any()


def test_sdxl_batch_with_one_negative_encodes_every_one(models) -> None:  # type: ignore[no-untyped-def]
    empty, blurry = uncond_entry(models["sdxl"], ("", "blurry"))
    assert empty.context.abs().sum() > 0 and blurry.context.abs().sum() > 0


def test_sd1_empty_negative_is_the_encoded_empty_prompt(models) -> None:  # type: ignore[no-untyped-def]
    (entry,) = uncond_entry(models["sd1"], ("",))
    assert entry.context.abs().sum() > 0


@pytest.mark.parametrize(("prompt", "empty"), [("", True), ("<lora:a:1>", True), ("blurry", False), (" ", False),
                                                ("# a comment leaves its line break", False)])
def test_is_empty_prompt(prompt: str, empty: bool) -> None:
    assert is_empty_prompt(prompt) is empty
