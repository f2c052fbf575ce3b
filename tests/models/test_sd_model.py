import pytest
import torch

from sdserver.models.build import build_model
from sdserver.models.families import detect
from sdserver.models.sd_model import SDModel, sd_alphas_cumprod
from sdserver.models.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def model(tiny_state: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> SDModel:
    match = detect({k: tuple(v.shape) for k, v in tiny_state.items()})
    return build_model(tiny_state, match, torch.float32, "cpu", tokenizer)


def test_schedule_gives_a1111_sigma_range() -> None:
    alphas = sd_alphas_cumprod()
    sigmas = ((1 - alphas) / alphas) ** 0.5
    assert alphas.shape == (1000,) and alphas.dtype == torch.float32
    # A1111 reports the SD 1.x eps model's sigma ends as about 0.0292 and 14.6146.
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_facts(model: SDModel) -> None:
    assert model.family == "sd1" and model.prediction_type == "eps"
    assert model.latent_channels == 4 and model.latent_scale == 8 and model.default_size == (512, 512)
    assert model.scaling_factor == pytest.approx(0.18215)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


def test_clip_skip_takes_an_earlier_layer(model: SDModel, tokenizer: CLIPTokenizer) -> None:
    ids = [tokenizer.bos_id, *tokenizer.encode("a blue square"), tokenizer.eos_id]
    tokens = torch.tensor([ids + [tokenizer.eos_id] * (77 - len(ids))])
    last = model.encode_tokens(tokens, clip_skip=1)
    penultimate = model.encode_tokens(tokens, clip_skip=2)
    assert last.pooled is None  # SD 1.x conditions on the sequence only
    assert last.context.shape == penultimate.context.shape == (1, 77, 32)
    assert not torch.allclose(last.context, penultimate.context)
    with torch.no_grad():
        expected = model.text_encoders[0](tokens, 2)[0]
    torch.testing.assert_close(penultimate.context, expected)


def test_vae_scaling(model: SDModel) -> None:
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    latent = model.encode_image(image)
    with torch.no_grad():
        mean = model.vae.encode(image)
    torch.testing.assert_close(latent, mean * 0.18215)
    with torch.no_grad():
        decoded = model.vae.decode(latent / 0.18215)
    torch.testing.assert_close(model.decode_latent(latent), decoded)


def test_inputs_are_cast_and_outputs_are_float32(tiny_state: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    match = detect({k: tuple(v.shape) for k, v in tiny_state.items()})
    half = build_model(tiny_state, match, torch.bfloat16, "cpu", tokenizer)
    out = half.apply_unet(torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([3]), torch.randn(1, 77, 32))
    assert half.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert half.decode_latent(torch.randn(1, 4, 4, 4)).dtype == torch.float32
    assert half.encode_tokens(torch.zeros(1, 77, dtype=torch.int32)).context.dtype == torch.float32


def test_token_embeds_replace_the_lookup(model: SDModel, tokenizer: CLIPTokenizer) -> None:
    ids = [tokenizer.bos_id, *tokenizer.encode("a cat"), tokenizer.eos_id]
    tokens = torch.tensor([ids + [tokenizer.eos_id] * (77 - len(ids))])
    table = model.text_encoders[0].embeddings.token_embedding
    with torch.no_grad():
        same = table(tokens)
        changed = same.clone()
        changed[0, 2] = torch.randn(32)
    plain = model.encode_tokens(tokens).context
    torch.testing.assert_close(model.encode_tokens(tokens, token_embeds=[same]).context, plain)
    spliced = model.encode_tokens(tokens, token_embeds=[changed]).context
    assert torch.equal(spliced[0, :2], plain[0, :2])  # causal: positions before the splice are untouched
    assert not torch.allclose(spliced[0, 2:], plain[0, 2:])
    with pytest.raises(ValueError, match="2 entries for 1"):
        model.encode_tokens(tokens, token_embeds=[same, same])


def test_vae_can_keep_its_own_dtype(tiny_state: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    match = detect({k: tuple(v.shape) for k, v in tiny_state.items()})
    model = build_model(tiny_state, match, torch.bfloat16, "cpu", tokenizer, vae_dtype=torch.float32)
    assert model.dtype == torch.bfloat16 and model.vae.decoder.conv_out.weight.dtype == torch.float32
    latent = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(model.decode_latent(latent), model.vae.decode(latent / 0.18215))
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


def test_zero_terminal_snr_schedule() -> None:
    plain, rescaled = sd_alphas_cumprod(), sd_alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(rescaled[0], plain[0])  # the first step keeps its noise level
    sigma_max = ((1 - rescaled[-1]) / rescaled[-1]) ** 0.5
    assert 4000 < sigma_max.item() < 5000  # finite, as A1111's rescale
    assert bool((rescaled[1:-1] < plain[1:-1]).all())  # every other step is noisier


def test_ztsnr_marker_is_detected(tiny_state: dict[str, torch.Tensor], tokenizer: CLIPTokenizer) -> None:
    state = {**tiny_state, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}
    match = detect({k: tuple(v.shape) for k, v in state.items()})
    assert match.spec.zero_terminal_snr and match.spec.prediction_type == "v"
    model = build_model(state, match, torch.float32, "cpu", tokenizer)
    torch.testing.assert_close(model.alphas_cumprod, sd_alphas_cumprod(zero_terminal_snr=True))
