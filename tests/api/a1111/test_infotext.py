import io
import json
from dataclasses import replace

import pytest
from PIL import Image, PngImagePlugin

from sdserver.api.a1111.images import encode_image
from sdserver.api.a1111.infotext import (
    create_infotext,
    format_params,
    generation_params,
    parse_infotext,
    png_info,
    quote,
    version_string,
)
from sdserver.engine.types import (
    GenerationRequest,
    GenerationResult,
    HiresParams,
    InpaintParams,
    NoiseSource,
    SamplingParams,
    SeedParams,
)
from sdserver.api.a1111.options import default_options

SECTION4_EXAMPLE = (
    "a cat wearing a hat, (detailed fur:1.2) <lora:catStyle:0.8>\n"
    "Negative prompt: lowres, blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234567890, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, Clip skip: 2, "
    'Hires upscale: 2.0, Hires upscaler: Latent, Lora hashes: "catStyle: 0123456789ab", Version: v1.10.1'
)
SECTION33_EXAMPLE = (
    "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, "
    "Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def _infotext(gen, result, seed=None, subseed=0, options=None, version="v1.10.1"):
    params = generation_params(gen, result, options or default_options(),
                               seed=gen.seeds.seed if seed is None else seed, subseed=subseed, version=version)
    return create_infotext(gen.prompt, gen.negative_prompt, params)


def _result(**kwargs):
    return GenerationResult(images=(), model_name="v1-5-pruned-emaonly", model_hash="6ce0161689", **kwargs)


def test_section4_example_exactly():
    gen = GenerationRequest(
        prompt="a cat wearing a hat, (detailed fur:1.2) <lora:catStyle:0.8>",
        negative_prompt="lowres, blurry",
        width=512, height=768,
        sampling=SamplingParams(sampler="dpmpp_2m", scheduler="automatic", steps=20, cfg_scale=7.0),
        seeds=SeedParams(seed=1234567890, noise_source=NoiseSource.GPU),
        clip_skip=2,
        hires=HiresParams(scale=2.0, upscaler="Latent", denoising_strength=0.5),
    )
    result = _result(extra_params={"Lora hashes": "catStyle: 0123456789ab"})
    assert _infotext(gen, result) == SECTION4_EXAMPLE


def test_section33_example_exactly():
    gen = GenerationRequest(prompt="a cat", sampling=SamplingParams(sampler="euler", steps=20),
                            seeds=SeedParams(seed=1234, noise_source=NoiseSource.GPU))
    assert _infotext(gen, _result()) == SECTION33_EXAMPLE


def test_cpu_noise_writes_rng_and_options_toggle_keys():
    gen = GenerationRequest(prompt="p", sampling=SamplingParams(sampler="euler_a", steps=5),
                            seeds=SeedParams(seed=7))
    text = _infotext(gen, _result())
    assert ", RNG: CPU, Version: v1.10.1" in text
    opts = default_options() | {"add_model_hash_to_info": False, "add_version_to_infotext": False}
    text = _infotext(gen, _result(), options=opts)
    assert "Model hash" not in text and "Version" not in text and "Model: v1-5-pruned-emaonly" in text


def test_conditional_keys():
    gen = GenerationRequest(
        prompt="(a)",
        sampling=SamplingParams(sampler="dpm2_a", scheduler="exponential", steps=12, cfg_scale=5.5, eta=0.5,
                                s_noise=0.9),
        seeds=SeedParams(seed=3, subseed=9, subseed_strength=0.25, seed_resize_from_w=256, seed_resize_from_h=320,
                         noise_source=NoiseSource.NV, eta_noise_seed_delta=31337),
        clip_skip=1, tiling=True, emphasis="No norm",
    )
    params = generation_params(gen, _result(), default_options(), seed=3, subseed=9, version="x")
    assert params["Schedule type"] == "Exponential"
    assert params["Variation seed"] == 9 and params["Variation seed strength"] == 0.25
    assert params["Seed resize from"] == "256x320"
    assert params["Clip skip"] is None
    assert params["ENSD"] == 31337
    assert params["RNG"] == "NV"
    assert params["Tiling"] == "True"
    assert params["Eta"] == 0.5 and params["Sigma noise"] == 0.9
    euler_a = replace(gen, sampling=replace(gen.sampling, sampler="euler_a"))
    assert "Sigma noise" not in generation_params(euler_a, _result(), default_options(), seed=3, subseed=9,
                                                  version="x")
    assert params["Emphasis"] == "No norm"
    text = create_infotext(gen.prompt, "", params)
    keys = [part.split(":")[0] for part in text.splitlines()[-1].split(", ")]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                    "Variation seed", "Variation seed strength", "Seed resize from", "ENSD", "RNG", "Tiling",
                    "Emphasis", "Eta", "Sigma noise", "Version"]


def test_ensd_only_for_samplers_that_use_it():
    gen = GenerationRequest(sampling=SamplingParams(sampler="euler"),
                            seeds=SeedParams(seed=1, eta_noise_seed_delta=31337))
    assert generation_params(gen, _result(), default_options(), seed=1, subseed=0, version="x")["ENSD"] is None


def test_img2img_inpaint_keys():
    gen = GenerationRequest(
        prompt="p", init_images=(Image.new("RGB", (8, 8)),), denoising_strength=0.6, initial_noise_multiplier=0.9,
        inpaint=InpaintParams(mask=Image.new("L", (8, 8)), mask_blur_x=4, mask_blur_y=4, invert=True, fill=2,
                              full_res=True, full_res_padding=32),
        sampling=SamplingParams(sampler="ddim", eta=0.3),
        seeds=SeedParams(seed=1),
    )
    params = generation_params(gen, _result(is_using_inpainting_conditioning=True), default_options(), seed=1,
                               subseed=0, version="x")
    assert params["Denoising strength"] == 0.6
    assert params["Conditional mask weight"] == 1.0
    assert params["Mask blur"] == 4 and params["Inpaint area"] == "Only masked"
    assert params["Masked area padding"] == 32 and params["Masked content"] == "latent noise"
    assert params["Mask mode"] == "Inpaint not masked" and params["Noise multiplier"] == 0.9
    assert params["Eta DDIM"] == 0.3 and "Eta" not in params


def test_quoting_rule():
    assert quote("plain") == "plain"
    assert quote(7.0) == 7.0
    assert quote("a, b") == '"a, b"'
    assert quote("k: v") == '"k: v"'
    assert quote('say "hi", ok') == '"say \\"hi\\", ok"'
    assert quote("line\nbreak") == '"line\\nbreak"'
    assert quote("naïve, ü") == '"naïve, ü"'  # ensure_ascii=False
    assert format_params({"A": 1, "B": None, "Flag": "Flag", "C": "x, y"}) == 'A: 1, Flag, C: "x, y"'


def test_parse_section4_example():
    res = parse_infotext(SECTION4_EXAMPLE)
    assert res["Prompt"] == "a cat wearing a hat, (detailed fur:1.2) <lora:catStyle:0.8>"
    assert res["Negative prompt"] == "lowres, blurry"
    assert res["Steps"] == "20" and res["Sampler"] == "DPM++ 2M" and res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "7.0" and res["Seed"] == "1234567890"
    assert res["Size-1"] == "512" and res["Size-2"] == "768" and "Size" not in res
    assert res["Lora hashes"] == "catStyle: 0123456789ab"
    assert res["Clip skip"] == "2" and res["Hires upscale"] == "2.0"
    # defaults A1111 adds for missing keys
    assert res["RNG"] == "GPU" and res["Hires sampler"] == "Use same sampler" and res["Hires resize-1"] == 0
    assert res["Masked area padding"] == 32


def test_parse_adds_clip_skip_and_schedule_defaults():
    res = parse_infotext(SECTION33_EXAMPLE)
    assert res["Clip skip"] == "1" and res["Schedule type"] == "Automatic"
    assert parse_infotext(SECTION33_EXAMPLE, add_defaults=False).get("Clip skip") is None


def test_parse_multiline_prompts():
    text = "line one\nline two\nNegative prompt: neg one\nneg two\nSteps: 5, Sampler: Euler, Seed: 2"
    res = parse_infotext(text)
    assert res["Prompt"] == "line one\nline two" and res["Negative prompt"] == "neg one\nneg two"
    assert res["Steps"] == "5"


def test_short_last_line_is_prompt_text():
    res = parse_infotext("just a prompt\nwith: one colon")
    assert res["Prompt"] == "just a prompt\nwith: one colon" and "with" not in res


@pytest.mark.parametrize("value", ['quoted "inner", text', "multi\nline: prompt", "a, b: c", "ümlaut, ✓"])
def test_writer_parser_round_trip(value):
    gen = GenerationRequest(prompt="p\nq", negative_prompt="n", sampling=SamplingParams(sampler="dpmpp_2m_sde"),
                            seeds=SeedParams(seed=42),
                            hires=HiresParams(scale=1.5, prompt=value, second_pass_steps=7, sampler="euler"))
    result = _result(extra_params={"Lora hashes": "x: 123, y: 456"})
    params = generation_params(gen, result, default_options(), seed=42, subseed=0, version=version_string("0.1.0"))
    parsed = parse_infotext(create_infotext(gen.prompt, gen.negative_prompt, params))
    assert parsed["Prompt"] == "p\nq" and parsed["Negative prompt"] == "n"
    assert parsed["Hires prompt"] == value
    assert parsed["Lora hashes"] == "x: 123, y: 456"
    assert parsed["Hires sampler"] == "Euler" and parsed["Hires steps"] == "7"
    assert parsed["Version"] == "sdserver-0.1.0"
    for key, written in params.items():
        if written is not None and key not in ("Size",):
            assert parsed[key] == str(written), key


def _png_with_text(**chunks):
    meta = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        meta.add_text(k, v)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=meta)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_png_info_reads_parameters_chunk_and_items():
    img = _png_with_text(parameters=SECTION33_EXAMPLE, Software="thing")
    out = png_info(img)
    assert out["info"] == SECTION33_EXAMPLE
    assert out["items"] == {"Software": "thing"}
    assert out["parameters"]["Seed"] == "1234"
    json.dumps(out)


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_png_info_reads_back_encoded_images(fmt):
    import base64

    text = "ünïcode prompt\nSteps: 3, Sampler: Euler, Seed: 5, Size: 8x8"
    data = encode_image(Image.new("RGB", (8, 8)), fmt, text)
    out = png_info(Image.open(io.BytesIO(base64.b64decode(data))))
    assert out["info"] == text
    assert out["parameters"]["Prompt"] == "ünïcode prompt"


def test_png_info_without_metadata_still_has_defaults():
    out = png_info(Image.new("RGB", (4, 4)))
    assert out["info"] == "" and out["items"] == {}
    assert out["parameters"]["Clip skip"] == "1"


def test_png_info_reads_novelai_metadata():
    comment = json.dumps({"uc": "lowres", "steps": 28, "scale": 11, "seed": 123, "sampler": "k_euler_ancestral"})
    img = _png_with_text(Software="NovelAI", Description="1girl", Comment=comment)
    out = png_info(img)
    assert out["info"].startswith("1girl\nNegative prompt: lowres\nSteps: 28, Sampler: Euler a, CFG scale: 11")
    assert out["parameters"]["ENSD"] == "31337" and out["parameters"]["Size-1"] == "4"


def test_png_info_reads_gif_comment():
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, format="GIF", comment=b"gif prompt\nSteps: 2, Sampler: Euler, Seed: 1")
    out = png_info(Image.open(io.BytesIO(buffer.getvalue())))
    assert out["info"].startswith("gif prompt") and out["parameters"]["Steps"] == "2"


def test_eta_option_reaches_the_infotext_and_ensd():
    gen = GenerationRequest(sampling=SamplingParams(sampler="euler_a", eta_ancestral=0.0),
                            seeds=SeedParams(seed=1, eta_noise_seed_delta=31337))
    params = generation_params(gen, _result(), default_options(), seed=1, subseed=0, version="x")
    assert params["Eta"] == 0.0 and params["ENSD"] is None  # A1111: eta 0 means ENSD has no effect
    ddim = GenerationRequest(sampling=SamplingParams(sampler="ddim", eta_ddim=0.1), seeds=SeedParams(seed=1))
    assert generation_params(ddim, _result(), default_options(), seed=1, subseed=0, version="x")["Eta DDIM"] == 0.1


def test_lora_and_ti_hashes_are_written_as_a1111_does() -> None:
    from sdserver.api.a1111.infotext import _hashes

    assert _hashes((("cat:style,v2", "0123456789ab"), ("b", "ffffffffffff"))) == "catstylev2: 0123456789ab, b: ffffffffffff"
    assert _hashes(()) is None
