"""The refiner through the local engine: tiny SDXL base and refiner checkpoints in the original layout, the
switch step under A1111's rules, the refiner's own conditioning, restoring the base, and a 422 for a bad name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdserver.engine.engine import Libraries, LocalEngine
from sdserver.engine.types import (
    GenerationRequest, InpaintParams, RefinerParams, SamplingParams, SeedParams,
)
from sdserver.errors import InvalidRequest, UnsupportedFeature
from sdserver.engine.types import HiresParams
from sdserver.models.manager import ModelManager
from sdserver.models.synthetic import (
    random_state_dict, save_checkpoint, tiny_sd1_configs, tiny_sdxl_configs, tiny_sdxl_refiner_configs,
)
from sdserver.networks import EmbeddingDatabase, NetworkLibrary
from sdserver.upscalers.registry import UpscalerRegistry


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refiner") / "Stable-diffusion"
    save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(), seed=1), folder / "base.safetensors")
    save_checkpoint(random_state_dict("sdxl_refiner", tiny_sdxl_refiner_configs(), seed=2),
                    folder / "sub" / "refiner.safetensors")
    save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(inpainting=True), seed=3),
                    folder / "inpaint.safetensors")
    save_checkpoint(random_state_dict("sd1", tiny_sd1_configs(), seed=4), folder / "sd1.safetensors")
    return folder


def make_engine(folder: Path, tmp_path: Path, limit: int = 1) -> LocalEngine:
    manager = ModelManager([folder], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32, limit=limit)
    libraries = Libraries(UpscalerRegistry({}), NetworkLibrary([tmp_path / "Lora"]),
                          EmbeddingDatabase([tmp_path / "embeddings"]))
    return LocalEngine(manager, libraries)


REQUEST = GenerationRequest(
    prompt="a red circle", width=64, height=64, checkpoint="base.safetensors",
    sampling=SamplingParams(sampler="euler", steps=10), seeds=SeedParams(seed=3),
)


def record_unet_calls(engine: LocalEngine, names: list[str]) -> list[str]:
    """Load each checkpoint (kept: the engine's cache holds them all) and log which UNet each call runs."""
    calls: list[str] = []
    for name in names:
        model = engine.manager.load(name)
        model.unet.register_forward_pre_hook(lambda _m, _a, label=name: calls.append(label))
    return calls


@pytest.mark.parametrize(
    ("sampler", "switch_at", "by_steps", "before", "after"),
    [
        # Euler, 10 uniform steps: t = 999 - 111 i, so (999 - t) / 1000 = 0.111 i; 0.5 is first reached at i = 5.
        ("euler", 0.5, False, 5, 5),
        ("euler", 0.8, False, 8, 2),
        # 0.85: 0.888 at i = 8 by noise level; by steps, 8/10 < 0.85 <= 9/10.
        ("euler", 0.85, False, 8, 2),
        ("euler", 0.85, True, 9, 1),
        # DDIM walks t = 901, 801, ..., 101 (9 calls); (999 - 401) / 1000 is the first >= 0.5.
        ("ddim", 0.5, False, 5, 4),
        # None switches at the first call, as A1111.
        ("euler", None, False, 0, 10),
    ],
)
def test_switch_happens_at_a1111s_step(
    ckpt_dir: Path, tmp_path: Path, control, sampler: str, switch_at: float | None, by_steps: bool,  # type: ignore[no-untyped-def]
    before: int, after: int,
) -> None:
    engine = make_engine(ckpt_dir, tmp_path, limit=3)
    calls = record_unet_calls(engine, ["sub/refiner.safetensors", "base.safetensors"])
    request = replace(
        REQUEST, sampling=replace(REQUEST.sampling, sampler=sampler),
        refiner=RefinerParams("refiner", switch_at, by_sampling_steps=by_steps),
    )
    result = engine.generate(request, control)
    assert calls == ["base.safetensors"] * before + ["sub/refiner.safetensors"] * after
    assert len(control.steps) == (9 if sampler == "ddim" else 10)
    assert result.refiner is not None and result.refiner.name == "refiner"
    assert result.refiner.switch_at == switch_at and result.refiner.by_sampling_steps == by_steps
    assert result.refiner.hash == engine.manager.resolve("refiner").hash and result.refiner.hash
    assert result.model_name == "base" and engine.current_checkpoint().name == "base.safetensors"  # type: ignore[union-attr]


def test_the_base_comes_back_and_images_differ_from_the_base_alone(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path, limit=1)
    plain = engine.generate(REQUEST, control)
    refined = engine.generate(replace(REQUEST, refiner=RefinerParams("refiner.safetensors", 0.5), n_iter=2), control)
    assert engine.current_checkpoint().name == "base.safetensors"  # type: ignore[union-attr]
    assert plain.refiner is None and refined.refiner is not None
    assert [p.size for p in (refined.images[0].image, refined.images[1].image)] == [(64, 64), (64, 64)]
    assert refined.images[0].image.tobytes() != plain.images[0].image.tobytes()
    again = engine.generate(REQUEST, control)
    assert again.images[0].image.tobytes() == plain.images[0].image.tobytes()


def test_each_batch_starts_on_the_base(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path, limit=3)
    calls = record_unet_calls(engine, ["sub/refiner.safetensors", "base.safetensors"])
    engine.generate(replace(REQUEST, n_iter=2, refiner=RefinerParams("refiner", 0.8)), control)
    one = ["base.safetensors"] * 8 + ["sub/refiner.safetensors"] * 2
    assert calls == one + one


def test_unknown_refiner_is_a_422_before_anything_runs(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path)
    with pytest.raises(InvalidRequest) as err:
        engine.generate(replace(REQUEST, refiner=RefinerParams("no-such-model", 0.8)), control)
    assert err.value.status_code == 422 and err.value.field == "refiner_checkpoint"
    assert control.steps == [] and engine.current_checkpoint() is None


def test_refiner_with_a_hires_checkpoint_is_refused_naming_the_field(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path)
    hires = HiresParams(checkpoint="sd1")
    with pytest.raises(UnsupportedFeature) as err:
        engine.generate(replace(REQUEST, refiner=RefinerParams("refiner", 0.8), hires=hires), control)
    assert err.value.field == "hr_checkpoint_name" and control.steps == []


HIRES = HiresParams(scale=1.5, upscaler="Latent", second_pass_steps=4, denoising_strength=0.5)


@pytest.mark.parametrize(
    ("hires_pass", "switch_at", "first", "second"),
    [
        # A1111's default: the first pass stays on the base; the hires pass (8-step schedule entered at step 4,
        # t = 428, 285, 143, 0) reaches 0.8 at t = 143.
        ("second pass", 0.8, (10, 0), (2, 2)),
        # Switched in the first pass, the hires pass runs wholly on the refiner.
        ("first pass", 0.5, (5, 5), (0, 4)),
        ("both passes", 0.5, (5, 5), (0, 4)),
    ],
)
def test_hires_refiner_pass_option(  # type: ignore[no-untyped-def]
    ckpt_dir: Path, tmp_path: Path, control, hires_pass: str, switch_at: float, first: tuple[int, int],
    second: tuple[int, int],
) -> None:
    engine = make_engine(ckpt_dir, tmp_path, limit=3)
    calls = record_unet_calls(engine, ["sub/refiner.safetensors", "base.safetensors"])
    request = replace(REQUEST, hires=HIRES, refiner=RefinerParams("refiner", switch_at, hires_pass=hires_pass))
    result = engine.generate(request, control)
    b, r = "base.safetensors", "sub/refiner.safetensors"
    assert calls == [b] * first[0] + [r] * first[1] + [b] * second[0] + [r] * second[1]
    assert result.images[0].image.size == (96, 96) and [p[2] for p in control.passes] == [10, 4]
    assert result.refiner is not None
    assert result.refiner.hires_pass == (None if hires_pass == "second pass" else hires_pass)
    assert engine.current_checkpoint().name == "base.safetensors"  # type: ignore[union-attr]


def test_refiner_naming_the_base_never_switches(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path)
    plain = engine.generate(REQUEST, control)
    same = engine.generate(replace(REQUEST, refiner=RefinerParams("base", 0.0)), control)
    assert same.refiner is None and same.images[0].image.tobytes() == plain.images[0].image.tobytes()


def test_any_checkpoint_may_refine_and_a_refiner_may_run_alone(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path)
    # An SD 1.x "refiner" after an SDXL base (A1111 allows any checkpoint): the same latent shape goes on.
    result = engine.generate(replace(REQUEST, refiner=RefinerParams("sd1", 0.5)), control)
    assert result.refiner is not None and result.refiner.name == "sd1"
    # The refiner as the request's own model takes its aesthetic-score vector from the start.
    alone = engine.generate(replace(REQUEST, checkpoint="refiner"), control)
    assert alone.model_name == "refiner" and alone.refiner is None and alone.images[0].image.size == (64, 64)
    low = engine.generate(replace(REQUEST, checkpoint="refiner", aesthetic_score=1.0), control)
    assert low.images[0].image.tobytes() != alone.images[0].image.tobytes()


def test_img2img_and_sdxl_inpainting_switch_too(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path, limit=3)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = replace(REQUEST, init_images=(init,), denoising_strength=0.6, inpaint=InpaintParams(mask=mask),
                      refiner=RefinerParams("refiner", 0.8))
    calls = record_unet_calls(engine, ["sub/refiner.safetensors", "base.safetensors", "inpaint.safetensors"])
    result = engine.generate(request, control)
    # 10 steps at strength 0.6: the last 7 run (t_enc + 1), t = 666 down to 0; 0.8 is first reached at t = 111.
    assert calls == ["base.safetensors"] * 5 + ["sub/refiner.safetensors"] * 2
    assert result.refiner is not None and not result.is_using_inpainting_conditioning
    calls.clear()
    inpainted = engine.generate(replace(request, checkpoint="inpaint"), control)
    assert calls == ["inpaint.safetensors"] * 5 + ["sub/refiner.safetensors"] * 2
    assert inpainted.is_using_inpainting_conditioning and inpainted.images[0].image.size == (64, 64)
    # Outside the mask the input comes back (A1111's overlay of the original).
    assert inpainted.images[0].image.getpixel((2, 2)) == (200, 40, 40)


def test_txt2img_on_an_sdxl_inpainting_model_masks_everything(ckpt_dir: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(ckpt_dir, tmp_path, limit=3)
    calls = record_unet_calls(engine, ["sub/refiner.safetensors", "inpaint.safetensors"])
    plain = engine.generate(replace(REQUEST, checkpoint="inpaint"), control)
    assert calls == ["inpaint.safetensors"] * 10 and plain.images[0].image.size == (64, 64)
    calls.clear()
    refined = engine.generate(replace(REQUEST, checkpoint="inpaint", refiner=RefinerParams("refiner", 0.5)), control)
    assert calls == ["inpaint.safetensors"] * 5 + ["sub/refiner.safetensors"] * 5 and refined.refiner is not None


def test_txt2img_image_conditioning_is_a_full_mask_over_grey(tmp_path: Path) -> None:
    from sdserver.engine.refiner import txt2img_image_conditioning
    from sdserver.models.loader import load_checkpoint
    from sdserver.models.tokenizer import CLIPTokenizer

    model = load_checkpoint(save_checkpoint(random_state_dict("sdxl", tiny_sdxl_configs(inpainting=True), seed=3),
                                            tmp_path / "i.safetensors"), torch.float32, "cpu", CLIPTokenizer.load())
    cond = txt2img_image_conditioning(model, 2, 64, 32)
    assert cond.shape == (2, 5, 4, 8) and torch.equal(cond[:, 0], torch.ones(2, 4, 8))
    torch.testing.assert_close(cond[:, 1:], model.encode_image(torch.zeros(2, 3, 32, 64)))
