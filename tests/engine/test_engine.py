"""The local engine: device/precision choice, demo fallback, request dispatch and validation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdserver.engine.devices import pick_device, pick_dtype
from sdserver.engine.engine import Libraries, LocalEngine, fallback_checkpoint, seamless
from sdserver.networks import EmbeddingDatabase, NetworkLibrary
from sdserver.engine.types import GenerationRequest, HiresParams, SamplingParams, SeedParams
from sdserver.errors import InvalidRequest, ModelLoadError, NoModelAvailable
from sdserver.models.manager import ModelManager
from sdserver.settings import Settings
from sdserver.upscalers.registry import UpscalerRegistry


def empty_libraries(tmp_path: Path) -> Libraries:
    return Libraries(UpscalerRegistry({}), NetworkLibrary([tmp_path / "Lora"]), EmbeddingDatabase([tmp_path / "embeddings"]))


@pytest.fixture
def engine(tiny_checkpoint: Path, tmp_path: Path) -> LocalEngine:
    manager = ModelManager(
        [tiny_checkpoint.parent], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32,
        vae_dirs=[tmp_path / "VAE"],
    )
    return LocalEngine(manager, empty_libraries(tmp_path))


REQUEST = GenerationRequest(
    prompt="a red circle  # a comment", width=64, height=64,
    sampling=SamplingParams(sampler="euler", steps=2), seeds=SeedParams(seed=5),
)


def test_precision_follows_a1111_flags() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype(cpu, "full", False, True) == torch.float32
    assert pick_dtype(cpu, "autocast", True, True) == torch.float32
    assert pick_dtype(cpu, "autocast", False, True) == torch.bfloat16
    assert pick_dtype(cpu, "autocast", False, False) == torch.float32
    assert pick_dtype(torch.device("cuda"), "autocast", False, False) == torch.float16
    assert pick_device(("all",), None) == cpu


def test_demo_model_is_the_fallback_only_without_user_checkpoints(tmp_path: Path, tiny_checkpoint: Path) -> None:
    demo = tmp_path / "demo.safetensors"
    demo.write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = Settings(data_dir=tmp_path)
    assert fallback_checkpoint(settings, [empty], demo) == demo
    assert fallback_checkpoint(settings, [tiny_checkpoint.parent], demo) is None
    assert fallback_checkpoint(replace(settings, ckpt=tiny_checkpoint), [empty], demo) == tiny_checkpoint


def test_generate_reports_the_model_identity(engine: LocalEngine, control) -> None:  # type: ignore[no-untyped-def]
    result = engine.generate(REQUEST, control)
    assert result.model_name == "tiny"
    assert result.model_hash == engine.current_checkpoint().sha256[:10]  # type: ignore[union-attr]
    # Prompt text keeps its tags: the infotext shows what the user wrote.
    assert result.images[0].prompt == REQUEST.prompt


def test_unknown_hires_upscaler_is_refused_before_sampling(engine: LocalEngine, control) -> None:  # type: ignore[no-untyped-def]
    request = replace(REQUEST, hires=HiresParams(upscaler="4x-NoSuchModel"))
    with pytest.raises(InvalidRequest) as err:
        engine.generate(request, control)
    assert err.value.field == "hr_upscaler"
    assert control.steps == []


def test_tiling_makes_convolutions_circular_only_during_the_request(engine: LocalEngine) -> None:
    model = engine.manager.ensure_loaded()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with seamless(model, True):
        assert all(c.padding_mode == "circular" for c in convs)
    assert all(c.padding_mode == "zeros" for c in convs)


def test_tiled_images_wrap_around(engine: LocalEngine, control) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    def seam(image) -> float:  # type: ignore[no-untyped-def]
        a = np.asarray(image).astype(float)
        inner = np.abs(np.diff(a, axis=1)).mean()
        wrap = np.abs(a[:, 0] - a[:, -1]).mean()
        return wrap / inner

    plain = engine.generate(REQUEST, control).images[0].image
    tiled = engine.generate(replace(REQUEST, tiling=True), control).images[0].image
    assert seam(tiled) < seam(plain)


def test_no_checkpoint_answers_with_where_to_put_one(tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    manager = ModelManager([tmp_path / "none"], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32)
    engine = LocalEngine(manager, empty_libraries(tmp_path))
    with pytest.raises(NoModelAvailable) as err:
        engine.generate(REQUEST, control)
    assert "models/Stable-diffusion" in str(err.value) or "none" in str(err.value)
    assert engine.default_size() == (512, 512)


def write_kohya_lora(path: Path) -> None:
    """One LoRA on the first self-attention's query projection of the tiny UNet (32 wide), in kohya's names."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{key}.lora_down.weight": torch.randn(4, 32, generator=gen), f"{key}.lora_up.weight": torch.randn(32, 4, generator=gen),
         f"{key}.alpha": torch.tensor(4.0)},
        str(path), metadata={"ss_output_name": "shapes"},
    )


def test_a_lora_changes_the_image_and_its_removal_restores_it_exactly(engine: LocalEngine, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    (tmp_path / "Lora").mkdir()
    write_kohya_lora(tmp_path / "Lora" / "style.safetensors")
    before = np.asarray(engine.generate(REQUEST, control).images[0].image)
    with_lora = engine.generate(replace(REQUEST, prompt="a red circle <lora:style:1.5>"), control)
    after = np.asarray(engine.generate(REQUEST, control).images[0].image)
    assert not np.array_equal(before, np.asarray(with_lora.images[0].image))
    assert np.array_equal(before, after)
    assert [name for name, _ in with_lora.network_hashes] == ["style"]
    by_alias = engine.generate(replace(REQUEST, prompt="a red circle <lora:shapes:1.5>"), control)
    assert np.array_equal(np.asarray(by_alias.images[0].image), np.asarray(with_lora.images[0].image))


def test_an_unknown_lora_is_refused_naming_it(engine: LocalEngine, control) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest) as err:
        engine.generate(replace(REQUEST, prompt="a cat <lora:missing:1>"), control)
    assert err.value.field == "prompt" and "missing" in err.value.message
    # disable_extra_networks strips the tag without applying it.
    assert engine.generate(replace(REQUEST, prompt="a cat <lora:missing:1>", disable_extra_networks=True), control).images


def test_a_vae_swap_changes_the_image_and_none_restores_the_builtin(engine: LocalEngine, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from safetensors.torch import save_file

    model = engine.manager.ensure_loaded()
    other = {f"first_stage_model.{k}": v * 1.1 for k, v in model.vae.state_dict().items()}
    (tmp_path / "VAE").mkdir()
    save_file(other, str(tmp_path / "VAE" / "other.vae.safetensors"))
    assert [v.name for v in engine.vae_list()] == ["other.vae.safetensors"]
    builtin = np.asarray(engine.generate(REQUEST, control).images[0].image)
    swapped = engine.generate(replace(REQUEST, vae="other.vae.safetensors"), control)
    restored = np.asarray(engine.generate(replace(REQUEST, vae="None"), control).images[0].image)
    assert not np.array_equal(builtin, np.asarray(swapped.images[0].image))
    assert swapped.vae_name == "other.vae.safetensors" and len(swapped.vae_hash or "") == 10
    assert np.array_equal(builtin, restored)
    with pytest.raises(ModelLoadError) as err:
        engine.generate(replace(REQUEST, vae="missing.pt"), control)
    assert err.value.field == "sd_vae" and err.value.status_code == 422


def test_hires_checkpoint_runs_the_second_pass_then_restores_the_first(tiny_checkpoint: Path, tmp_path: Path, control) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpts"
    folder.mkdir()
    tensors = load_file(str(tiny_checkpoint))
    save_file(tensors, str(folder / "tiny.safetensors"))
    save_file({k: v * 1.5 if k.startswith("model.diffusion_model.out.") else v for k, v in tensors.items()},
              str(folder / "other.safetensors"))
    manager = ModelManager([folder], folder / "tiny.safetensors", tmp_path / "cache.json", torch.device("cpu"), torch.float32)
    engine = LocalEngine(manager, empty_libraries(tmp_path))
    hires = HiresParams(scale=1.5, upscaler="Latent", second_pass_steps=2, denoising_strength=0.6)
    same = engine.generate(replace(REQUEST, hires=hires), control)
    swapped = engine.generate(replace(REQUEST, hires=replace(hires, checkpoint="other.safetensors")), control)
    assert swapped.images[0].image.size == (96, 96)
    assert not np.array_equal(np.asarray(same.images[0].image), np.asarray(swapped.images[0].image))
    assert engine.current_checkpoint().name == "tiny.safetensors"  # type: ignore[union-attr]
