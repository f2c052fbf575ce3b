"""Applying networks to a tiny SD 1.x model loaded through the real loader: each type changes the output,
restoring gives the base weights bit for bit, multipliers route to their component."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserver.errors import InvalidRequest, UnsupportedFeature
from sdserver.models.sd_model import SDModel
from sdserver.models.tokenizer import CLIPTokenizer
from sdserver.networks import NetworkLibrary, apply_networks
from sdserver.pipeline.extra_networks import LoraCall


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k, v in before.items() if not (after[k].dtype == v.dtype and torch.equal(after[k], v))]
    assert not changed, f"parameters not restored: {changed[:5]}"


def param_shape(model: SDModel, component: str, module: str) -> torch.Size:
    root = model.unet if component == "unet" else model.text_encoders[0]
    return root.get_submodule(module).weight.shape


def lora_tensors(prefix: str, shape: torch.Size, rank: int, alpha: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors for a target weight of `shape` (linear [out, in] or conv [out, in, kh, kw])."""
    out_ch, in_ch = shape[0], shape[1]
    kernel = tuple(shape[2:])
    down = torch.randn((rank, in_ch, *kernel), generator=gen) * 0.3
    up = torch.randn((out_ch, rank, *((1, 1) if kernel else ())), generator=gen) * 0.3
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(alpha)}


def save_network(folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 suffix: str = ".safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def unet_output(model: SDModel, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=gen)
    context = torch.randn((1, 77, 32), generator=gen)
    return model.apply_unet(x, torch.tensor([500.0]), context)


def text_output(model: SDModel, tokenizer: CLIPTokenizer, text: str = "a red cube") -> torch.Tensor:
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    tokens = torch.tensor([ids + [tokenizer.eos_id] * (77 - len(ids))])
    return model.encode_tokens(tokens).context


TO_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
UNET_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": TO_Q,
    "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
}
TE_KOHYA = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "encoder.layers.1.mlp.fc1",
}


def kohya_lora(model: SDModel, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, module in UNET_KOHYA.items():
        tensors |= lora_tensors(key, param_shape(model, "unet", module), 4, 2.0, gen)
    for key, module in TE_KOHYA.items():
        tensors |= lora_tensors(key, param_shape(model, "text_encoder", module), 4, 2.0, gen)
    return tensors


def locon(model: SDModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tensors = lora_tensors("lora_unet_up_blocks_0_resnets_1_conv1", param_shape(model, "unet", "output_blocks.1.0.in_layers.2"), 4, 4.0, gen)
    tensors |= lora_tensors("lora_unet_down_blocks_0_downsamplers_0_conv", param_shape(model, "unet", "input_blocks.2.0.op"), 2, 1.0, gen)
    return tensors


def loha(model: SDModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    tensors: dict[str, torch.Tensor] = {}
    for key, module in [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v", "input_blocks.3.1.transformer_blocks.0.attn1.to_v"),
        ("lora_unet_up_blocks_1_resnets_0_conv2", "output_blocks.2.0.out_layers.3"),
    ]:
        shape = param_shape(model, "unet", module)
        flat_in = shape[1:].numel()
        for w in ("w1", "w2"):
            tensors[f"{key}.hada_{w}_a"] = torch.randn((shape[0], 3), generator=gen) * 0.5
            tensors[f"{key}.hada_{w}_b"] = torch.randn((3, flat_in), generator=gen) * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(3.0)
    return tensors


def lokr(model: SDModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert param_shape(model, "unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0") == (32, 32)
    tensors = {
        f"{key}.lokr_w1": torch.randn((4, 4), generator=gen),
        f"{key}.lokr_w2_a": torch.randn((8, 2), generator=gen) * 0.3,
        f"{key}.lokr_w2_b": torch.randn((2, 8), generator=gen) * 0.3,
        f"{key}.alpha": torch.tensor(2.0),
    }
    conv = "lora_unet_mid_block_resnets_0_conv2"
    assert param_shape(model, "unet", "middle_block.0.out_layers.3") == (64, 64, 3, 3)
    tensors[f"{conv}.lokr_w1"] = torch.randn((4, 4), generator=gen) * 0.3
    tensors[f"{conv}.lokr_w2"] = torch.randn((16, 16, 3, 3), generator=gen) * 0.3
    return tensors


def full_diff(model: SDModel) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {
        "lora_unet_conv_in.diff": torch.randn(param_shape(model, "unet", "input_blocks.0.0"), generator=gen) * 0.1,
        "lora_unet_conv_in.diff_b": torch.randn((32,), generator=gen) * 0.1,
        # to_q has no bias: a diff_b there adds one for the request, and restore takes it away again.
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff": torch.randn((32, 32), generator=gen) * 0.1,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff_b": torch.randn((32,), generator=gen),
    }


BUILDERS = {"kohya": kohya_lora, "locon": locon, "loha": loha, "lokr": lokr, "full": full_diff}


@pytest.fixture
def library(tmp_path: Path, model: SDModel) -> NetworkLibrary:
    folder = tmp_path / "Lora"
    for name, build in BUILDERS.items():
        save_network(folder, name, build(model))
    return NetworkLibrary([folder])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_each_network_type_changes_the_unet_and_restores_bit_for_bit(
    model: SDModel, library: NetworkLibrary, name: str
) -> None:
    before, base = snapshot(model), unet_output(model)
    with apply_networks(model, [LoraCall(name, 1.0, 1.0)], library) as applied:
        patched = unet_output(model)
        assert applied.touched and applied.unmatched[name] == 0 and not applied.errors
    assert (patched - base).abs().max() > 1e-4
    assert_bit_identical(model, before)
    assert torch.equal(unet_output(model), base)


def test_kohya_delta_is_multiplier_times_alpha_over_rank_times_up_down(model: SDModel, library: NetworkLibrary) -> None:
    tensors = kohya_lora(model)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    expected = 0.7 * (2.0 / 4) * (tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"])
    weight = model.unet.get_submodule(TO_Q).weight
    original = weight.detach().clone()
    with apply_networks(model, [LoraCall("kohya", 0.3, 0.7)], library):
        assert torch.allclose(weight - original, expected, atol=1e-6)
    assert torch.equal(weight, original)


def test_stacked_networks_add_up(model: SDModel, library: NetworkLibrary) -> None:
    weight = model.unet.get_submodule(TO_Q).weight
    original = weight.detach().clone()
    deltas = {}
    for name in ("kohya", "full"):
        with apply_networks(model, [LoraCall(name, 1.0, 1.0)], library):
            deltas[name] = weight.detach() - original
    with apply_networks(model, [LoraCall("kohya", 1.0, 1.0), LoraCall("full", 1.0, 1.0)], library):
        assert torch.allclose(weight - original, deltas["kohya"] + deltas["full"], atol=1e-6)
    assert torch.equal(weight, original)


def test_full_diff_bias_is_added_and_removed(model: SDModel, library: NetworkLibrary) -> None:
    to_q = model.unet.get_submodule(TO_Q)
    assert to_q.bias is None
    with apply_networks(model, [LoraCall("full", 0.5, 0.5)], library):
        expected = 0.5 * full_diff(model)["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.diff_b"]
        assert to_q.bias is not None and torch.allclose(to_q.bias, expected)
    assert to_q.bias is None


def test_multiplier_zero_changes_nothing(model: SDModel, library: NetworkLibrary, tokenizer: CLIPTokenizer) -> None:
    before = snapshot(model)
    with apply_networks(model, [LoraCall("kohya", 0.0, 0.0)], library) as applied:
        assert applied.touched == []
        assert_bit_identical(model, before)


def test_te_and_unet_weights_touch_only_their_component(
    model: SDModel, library: NetworkLibrary, tokenizer: CLIPTokenizer
) -> None:
    base_unet, base_text = unet_output(model), text_output(model, tokenizer)
    with apply_networks(model, [LoraCall("kohya", 1.0, 0.0)], library) as applied:
        assert {c for c, _ in applied.touched} == {"text_encoder"}
        assert torch.equal(unet_output(model), base_unet)
        assert not torch.allclose(text_output(model, tokenizer), base_text)
    with apply_networks(model, [LoraCall("kohya", 0.0, 1.0)], library) as applied:
        assert {c for c, _ in applied.touched} == {"unet"}
        assert torch.equal(text_output(model, tokenizer), base_text)
        assert not torch.allclose(unet_output(model), base_unet)
    assert torch.equal(text_output(model, tokenizer), base_text)


def test_unknown_lora_is_refused_by_name_before_anything_changes(model: SDModel, library: NetworkLibrary) -> None:
    before = snapshot(model)
    with pytest.raises(InvalidRequest, match="no_such_lora") as info:
        apply_networks(model, [LoraCall("kohya", 1.0, 1.0), LoraCall("no_such_lora", 1.0, 1.0)], library)
    assert info.value.field == "prompt"
    assert_bit_identical(model, before)


def test_unsupported_type_is_refused_before_anything_changes(model: SDModel, tmp_path: Path) -> None:
    tensors = kohya_lora(model)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{key}.dora_scale"] = torch.ones(32, 1)
    save_network(tmp_path, "dora", tensors)
    before = snapshot(model)
    with pytest.raises(UnsupportedFeature, match="DoRA"):
        apply_networks(model, [LoraCall("dora", 1.0, 1.0)], NetworkLibrary([tmp_path]))
    assert_bit_identical(model, before)


def test_other_key_spellings_give_the_same_weights(model: SDModel, tmp_path: Path) -> None:
    kohya = kohya_lora(model)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down, alpha = kohya[f"{key}.lora_up.weight"], kohya[f"{key}.lora_down.weight"], kohya[f"{key}.alpha"]
    save_network(tmp_path, "kohya_one", {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": alpha})
    ldm = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_network(tmp_path, "ldm", {f"{ldm}.lora_up.weight": up, f"{ldm}.lora_down.weight": down, f"{ldm}.alpha": alpha})
    peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_network(tmp_path, "peft", {f"{peft}.lora_B.weight": up, f"{peft}.lora_A.weight": down, f"{peft}.alpha": alpha}, suffix=".pt")
    library = NetworkLibrary([tmp_path])
    weight = model.unet.get_submodule(TO_Q).weight
    results = []
    for name in ("kohya_one", "ldm", "peft"):
        with apply_networks(model, [LoraCall(name, 1.0, 1.0)], library) as applied:
            results.append(weight.detach().clone())
            assert applied.touched == [("unet", TO_Q + ".weight")]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_unmatched_and_misfit_modules_are_counted_not_applied(model: SDModel, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    tensors = lora_tensors("lora_unet_down_blocks_5_attentions_0_proj_in", torch.Size((8, 8)), 2, 1.0, gen)
    tensors |= lora_tensors("lora_te_text_model_encoder_layers_0_self_attn_k_proj", torch.Size((48, 48)), 2, 1.0, gen)
    tensors |= lora_tensors("lora_te_text_model_encoder_layers_0_self_attn_v_proj", torch.Size((32, 32)), 2, 1.0, gen)
    save_network(tmp_path, "odd", tensors)
    before = snapshot(model)
    with apply_networks(model, [LoraCall("odd", 1.0, 1.0)], NetworkLibrary([tmp_path])) as applied:
        assert applied.unmatched == {"odd": 1}
        assert applied.errors == {"odd": 1}
        assert applied.touched == [("text_encoder", "encoder.layers.0.self_attn.v_proj.weight")]
    assert_bit_identical(model, before)


def test_low_precision_weights_restore_bit_for_bit(model: SDModel, library: NetworkLibrary) -> None:
    half = copy.deepcopy(model).to(torch.bfloat16)
    before = snapshot(half)
    with apply_networks(half, [LoraCall(name, 0.8, 1.1) for name in BUILDERS], library) as applied:
        assert all(half.unet.get_parameter(p).dtype == torch.bfloat16 for c, p in applied.touched if c == "unet")
        assert not torch.equal(half.unet.get_parameter(TO_Q + ".weight"), before["unet." + TO_Q + ".weight"])
    assert_bit_identical(half, before)


def test_restore_is_idempotent_and_hashes_are_reported(model: SDModel, library: NetworkLibrary) -> None:
    before = snapshot(model)
    applied = apply_networks(model, [LoraCall("kohya", 1.0, 1.0), LoraCall("loha", 1.0, 1.0)], library)
    applied.restore()
    applied.restore()
    assert_bit_identical(model, before)
    assert list(applied.hashes) == ["kohya", "loha"]
    assert applied.hashes["kohya"] == library.hash("kohya") and len(applied.hashes["kohya"]) == 12


def test_no_calls_is_a_no_op(model: SDModel, library: NetworkLibrary) -> None:
    with apply_networks(model, [], library) as applied:
        assert applied.touched == [] and applied.hashes == {}
