"""Diffusers-format folders: listed like single files, renamed into the original layout, loaded bit-exactly.

The folders are written from the tiny synthetic checkpoints by an inverse mapping written here independently
of `sdserver.models.diffusers_format` (original name → diffusers name), so the two have to agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams
from sdserver.errors import ModelLoadError
from sdserver.models import catalog
from sdserver.models.diffusers_format import is_diffusers_folder, to_original
from sdserver.models.files import load_state_dict, read_shapes
from sdserver.models.manager import ModelManager, load_checkpoint
from sdserver.models.openclip import openclip_to_hf
from sdserver.models.synthetic import (
    random_sd1_state_dict,
    random_state_dict,
    save_checkpoint,
    sd15_configs,
    sdxl_configs,
    tiny_sd1_configs,
    tiny_sd2_configs,
    tiny_sdxl_configs,
)
from sdserver.pipeline.txt2img import txt2img

# ---- the inverse mapping: original single-file names → diffusers names

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
           "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def _resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise AssertionError(rest)


def unet_to_diffusers(state: dict[str, torch.Tensor], per_level: int) -> dict[str, torch.Tensor]:
    keys = list(state)
    out_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"output_blocks\.(\d+)\.1\.norm\.", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top = next((new + key[len(old):] for old, new in _TOP.items() if key.startswith(old + ".")), None)
        if top is not None:
            out[top] = value
            continue
        block, index, slot, rest = re.fullmatch(r"(input_blocks|output_blocks|middle_block)\.(\d+)\.?(\d+)?\.(.+)",
                                                key).groups()
        n = int(index)
        if block == "middle_block":
            name = "mid_block.attentions.0." + rest if n == 1 else f"mid_block.resnets.{n // 2}.{_resnet(rest)}"
        elif block == "input_blocks":
            level, j = (n - 1) // (per_level + 1), (n - 1) % (per_level + 1)
            if j == per_level:
                name = f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}"
            elif slot == "0":
                name = f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
            else:
                name = f"down_blocks.{level}.attentions.{j}.{rest}"
        else:
            level, j = n // (per_level + 1), n % (per_level + 1)
            upsample_slot = "2" if n in out_with_attention else "1"
            if slot == "0":
                name = f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
            elif slot == upsample_slot and rest.startswith("conv."):
                name = f"up_blocks.{level}.upsamplers.0.{rest}"
            else:
                name = f"up_blocks.{level}.attentions.{j}.{rest}"
        out[name] = value
    return out


_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_OLD = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def vae_to_diffusers(state: dict[str, torch.Tensor], *, old_names: bool = False) -> dict[str, torch.Tensor]:
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    attention = _VAE_ATTENTION_OLD if old_names else _VAE_ATTENTION
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)", name):
            part, group, level, what, index, rest = m.groups()
            number = int(level) if group == "down" else levels - 1 - int(level)
            if index is not None:
                name = f"{part}.{group}_blocks.{number}.resnets.{index}.{rest}"
            else:
                name = f"{part}.{group}_blocks.{number}.{group}samplers.0.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(.+)", name):
            name = f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{m.group(3)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", name):
            name = f"{m.group(1)}.mid_block.attentions.0.{attention[m.group(2)]}.{m.group(3)}"
            if value.ndim == 4:
                value = value.reshape(value.shape[:2])
        out[name] = value
    return out


def with_prefix(state: dict[str, torch.Tensor], prefix: str, new: str = "") -> dict[str, torch.Tensor]:
    return {new + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def openclip_to_transformers(state: dict[str, torch.Tensor], *, projection: bool) -> dict[str, torch.Tensor]:
    hf = openclip_to_hf(state, keep_projection=projection)
    return {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in hf.items()}


def write_folder(folder: Path, components: dict[str, dict[str, torch.Tensor]], *, hidden_act: str = "quick_gelu",
                 prediction: str | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for name, tensors in components.items():
        sub = folder / name
        sub.mkdir()
        filename = "diffusion_pytorch_model.safetensors" if name in ("unet", "vae") else "model.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(sub / filename))
        config = {"hidden_act": hidden_act if name == "text_encoder" else "gelu"} if "text" in name else {}
        (sub / "config.json").write_text(json.dumps(config))
    if prediction is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    return folder


def sd1_folder(state: dict[str, torch.Tensor], folder: Path, *, old_vae_names: bool = False, **kw) -> Path:  # type: ignore[no-untyped-def]
    return write_folder(folder, {
        "unet": unet_to_diffusers(with_prefix(state, "model.diffusion_model."), per_level=1),
        "vae": vae_to_diffusers(with_prefix(state, "first_stage_model."), old_names=old_vae_names),
        "text_encoder": with_prefix(state, "cond_stage_model.transformer."),
    }, **kw)


def sdxl_folder(state: dict[str, torch.Tensor], folder: Path) -> Path:
    return write_folder(folder, {
        "unet": unet_to_diffusers(with_prefix(state, "model.diffusion_model."), per_level=1),
        "vae": vae_to_diffusers(with_prefix(state, "first_stage_model.")),
        "text_encoder": with_prefix(state, "conditioner.embedders.0.transformer."),
        "text_encoder_2": openclip_to_transformers(with_prefix(state, "conditioner.embedders.1.model."),
                                                   projection=True),
    })


# ---- fixtures


@pytest.fixture(scope="module")
def sd1_state() -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(*tiny_sd1_configs(), seed=3)


@pytest.fixture(scope="module")
def sdxl_state() -> dict[str, torch.Tensor]:
    return random_state_dict("sdxl", tiny_sdxl_configs(), seed=4)


def request() -> GenerationRequest:
    return GenerationRequest(
        prompt="a red circle", negative_prompt="blur", width=64, height=64,
        sampling=SamplingParams(sampler="euler", scheduler="automatic", steps=3, cfg_scale=6.0),
        seeds=SeedParams(seed=77),
    )


def pixels(model, control) -> np.ndarray:  # type: ignore[no-untyped-def]
    images, _ = txt2img(model, request(), control)
    return np.asarray(images[0].image)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


# ---- tests


def test_sd1_folder_reads_as_the_original_state_dict(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sd1_folder(sd1_state, tmp_path / "tiny-diffusers")
    assert is_diffusers_folder(folder)
    assert not is_diffusers_folder(folder / "unet")
    assert_same_tensors(load_state_dict(folder), sd1_state)
    assert read_shapes(folder) == {k: tuple(v.shape) for k, v in sd1_state.items()}


def test_older_diffusers_vae_attention_names_map_too(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sd1_folder(sd1_state, tmp_path / "old", old_vae_names=True)
    assert_same_tensors(load_state_dict(folder), sd1_state)


def test_sdxl_folder_reads_as_the_original_state_dict(sdxl_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sdxl_folder(sdxl_state, tmp_path / "xl")
    loaded = load_state_dict(folder)
    # The contrastive temperature is OpenCLIP training state that transformers' format doesn't carry.
    want = {k: v for k, v in sdxl_state.items() if not k.endswith("logit_scale")}
    assert_same_tensors(loaded, want)
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    width = tiny_sdxl_configs()[3].width
    assert loaded[fused].shape == (3 * width, width)
    assert read_shapes(folder) == {k: tuple(v.shape) for k, v in want.items()}


def test_sd2_folder_conditions_as_the_single_file(tmp_path: Path) -> None:
    """Diffusers stores SD 2.x's OpenCLIP encoder without its last layer (it conditions on the final one); the
    folder must condition as the original file does on its penultimate layer."""
    state = random_state_dict("sd2", tiny_sd2_configs(), seed=5)
    text = openclip_to_transformers(with_prefix(state, "cond_stage_model.model."), projection=False)
    last = tiny_sd2_configs()[2].layers - 1
    text = {k: v for k, v in text.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
    folder = write_folder(tmp_path / "sd2", {
        "unet": unet_to_diffusers(with_prefix(state, "model.diffusion_model."), per_level=1),
        "vae": vae_to_diffusers(with_prefix(state, "first_stage_model.")),
        "text_encoder": text,
    }, hidden_act="gelu", prediction="v_prediction")
    dropped = f"cond_stage_model.model.transformer.resblocks.{last}."
    want = {k: (torch.zeros_like(v) if k.startswith(dropped) else v)
            for k, v in state.items() if not k.endswith(("logit_scale", "text_projection"))}
    assert_same_tensors(load_state_dict(folder), want)
    from_folder = load_checkpoint(folder, torch.float32, "cpu")
    assert (from_folder.family, from_folder.prediction_type) == ("sd2", "v")
    from_file = load_checkpoint(save_checkpoint(state, tmp_path / "sd2.safetensors"), torch.float32, "cpu",
                                prediction_type="v")
    assert from_folder.spec == replace(from_file.spec, prediction_source="metadata")
    # (Random OpenCLIP weights give a context of mean ~0, which A1111's "Original" emphasis divides by, so the
    # comparison is of the conditioning itself rather than of pixels.)
    tokens = torch.tensor([[49406, 320, 736, 7117, 49407] + [0] * 72])
    with torch.no_grad():
        assert torch.equal(from_folder.encode_tokens(tokens).context, from_file.encode_tokens(tokens).context)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_folder_generates_the_same_pixels_as_the_single_file(  # type: ignore[no-untyped-def]
    family, sd1_state, sdxl_state, tmp_path: Path, control
) -> None:
    state = sd1_state if family == "sd1" else sdxl_state
    single = save_checkpoint(state, tmp_path / "single.safetensors")
    folder = (sd1_folder if family == "sd1" else sdxl_folder)(state, tmp_path / "folder")
    from_file = load_checkpoint(single, torch.float32, "cpu")
    from_folder = load_checkpoint(folder, torch.float32, "cpu")
    assert from_folder.family == family
    assert from_folder.spec == from_file.spec
    assert np.array_equal(pixels(from_folder, control), pixels(from_file, control))


def test_folders_are_listed_and_loaded_by_name(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "models" / "Stable-diffusion"
    save_checkpoint(sd1_state, root / "a-single.safetensors")
    sd1_folder(sd1_state, root / "sub" / "my-diffusers-model")
    infos = catalog.scan([root], compute_hashes=False)
    assert [i.name for i in infos] == ["a-single.safetensors", "sub/my-diffusers-model"]
    folder_info = infos[1]
    assert folder_info.title == "sub/my-diffusers-model"
    assert folder_info.model_name == "sub_my-diffusers-model"

    manager = ModelManager([root], None, tmp_path / "cache.json", torch.device("cpu"), torch.float32)
    model = manager.load("my-diffusers-model")
    assert model.family == "sd1"
    info = manager.current_info
    assert info is not None and info.filename == str(root / "sub" / "my-diffusers-model")
    # Hashed on first load, from its weight files, and stable.
    assert info.sha256 is not None and info.title == f"sub/my-diffusers-model [{info.sha256[:10]}]"
    again = catalog.hash_info(catalog.make_info(Path(info.filename), root), None)
    assert again.sha256 == info.sha256


def test_a_folder_without_vae_weights_is_refused_naming_it(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sd1_folder(sd1_state, tmp_path / "broken")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert catalog.scan([tmp_path], compute_hashes=True)[0].sha256 is None
    with pytest.raises(ModelLoadError, match=r"broken.*vae/"):
        load_checkpoint(folder, torch.float32, "cpu")


def test_weights_keep_their_stored_dtype_when_read(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd1_state.items()}
    folder = sd1_folder(half, tmp_path / "half")
    loaded = load_state_dict(folder)
    assert {v.dtype for k, v in loaded.items() if v.is_floating_point()} == {torch.float16}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_released_sizes_map_every_name(family: str) -> None:
    """The released SD 1.5 and SDXL layouts (3 or 4 levels, 2 resnets each, attention-free levels), on the meta
    device: every diffusers name comes back as its original name with its original shape."""
    configs = sd15_configs() if family == "sd1" else sdxl_configs()
    with torch.device("meta"):
        state = random_state_dict(family, configs)
    components = {
        "unet": unet_to_diffusers(with_prefix(state, "model.diffusion_model."), per_level=2),
        "vae": vae_to_diffusers(with_prefix(state, "first_stage_model.")),
    }
    if family == "sd1":
        components["text_encoder"] = with_prefix(state, "cond_stage_model.transformer.")
        layout, want = "clip", state
    else:
        components["text_encoder"] = with_prefix(state, "conditioner.embedders.0.transformer.")
        components["text_encoder_2"] = openclip_to_transformers(
            with_prefix(state, "conditioner.embedders.1.model."), projection=True
        )
        layout, want = "sdxl", {k: v for k, v in state.items() if not k.endswith("logit_scale")}
    got = to_original(components, layout)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}


def test_sharded_weights_are_read_through_their_index(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = sd1_folder(sd1_state, tmp_path / "sharded")
    whole = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_state_dict(whole)
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / "unet" / shard))
    whole.unlink()
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(load_state_dict(folder), sd1_state)
    assert catalog.hash_info(catalog.make_info(folder, tmp_path), None).sha256 is not None
    (folder / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing shards"):
        read_shapes(folder)


def test_a_folder_given_directly_is_the_default_checkpoint(sd1_state, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "models" / "Stable-diffusion"
    save_checkpoint(sd1_state, root / "a.safetensors")
    folder = sd1_folder(sd1_state, tmp_path / "elsewhere" / "given")
    manager = ModelManager([root], folder, tmp_path / "cache.json", torch.device("cpu"), torch.float32,
                           hashing=False)
    assert [i.name for i in manager.checkpoints()] == ["given", "a.safetensors"]
    assert manager.default_checkpoint().filename == str(folder)
