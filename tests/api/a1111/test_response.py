import base64
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

from sdserver.api.a1111.options import default_options
from sdserver.api.a1111.schemas import GenerationResponse, Img2ImgRequest, Txt2ImgRequest
from sdserver.api.a1111.translate import generation_response, img2img_request, txt2img_request

# clients.md, Responses 2: a strict client rejects a response that lacks one of these.
INFO_KEYS = [
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
    "is_using_inpainting_conditioning", "version",
]


def _run(body, seed_source, make_result, options=None, **result_kwargs):
    options = options or default_options()
    req = Txt2ImgRequest.model_validate(body)
    gen = txt2img_request(req, options, default_size=(64, 64), random_seed=seed_source)
    result = make_result(gen, **result_kwargs)
    out = generation_response(req, gen, result, options, job_timestamp="20240801120000", version="v1.10.1")
    return req, gen, out


def test_section33_info_example(seed_source, make_result):
    """A1111's own documented response for txt2img batch 2, Euler, seed 1234 (GPU noise)."""
    options = default_options() | {"randn_source": "GPU"}
    _, _, out = _run({"prompt": "a cat", "batch_size": 2, "sampler_name": "Euler", "seed": 1234,
                      "subseed": 3851990127, "steps": 20, "width": 512, "height": 512}, seed_source, make_result,
                     options)
    info = json.loads(out["info"])
    expected = {
        "prompt": "a cat", "all_prompts": ["a cat", "a cat"], "negative_prompt": "", "all_negative_prompts": ["", ""],
        "seed": 1234, "all_seeds": [1234, 1235], "subseed": 3851990127, "all_subseeds": [3851990127, 3851990128],
        "subseed_strength": 0, "width": 512, "height": 512, "sampler_name": "Euler", "cfg_scale": 7.0, "steps": 20,
        "batch_size": 2, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": "v1-5-pruned-emaonly", "sd_model_hash": "6ce0161689", "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [
            "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, "
            "Model: v1-5-pruned-emaonly, Version: v1.10.1",
            "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1235, Size: 512x512, Model hash: 6ce0161689, "
            "Model: v1-5-pruned-emaonly, Version: v1.10.1",
        ],
        "styles": [], "job_timestamp": "20240801120000", "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": "v1.10.1",
    }
    assert info == expected
    assert list(info) == INFO_KEYS


def test_response_shape_and_embedded_infotext(seed_source, make_result):
    _, _, out = _run({"prompt": "a dog", "n_iter": 2, "batch_size": 2, "seed": 500}, seed_source, make_result)
    GenerationResponse.model_validate(out)
    assert isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert list(info) == INFO_KEYS
    assert info["all_seeds"] == [500, 501, 502, 503]
    assert len(out["images"]) == 4 == len(info["infotexts"])
    for data, text in zip(out["images"], info["infotexts"]):
        assert not data.startswith("data:")
        png = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        assert png.format == "PNG"
        assert png.info["parameters"] == text
    assert "Seed: 502" in info["infotexts"][2] and "RNG: CPU" in info["infotexts"][0]


def test_parameters_echo_the_request_with_defaults(seed_source, make_result):
    _, gen, out = _run({"prompt": "x", "url": "http://elsewhere"}, seed_source, make_result)
    params = out["parameters"]
    assert params["seed"] == -1 and params["steps"] == 50 and params["sampler_index"] == "Euler"
    assert "url" not in params
    assert json.loads(out["info"])["seed"] == gen.seeds.seed == 1000


def test_send_images_false(seed_source, make_result):
    _, _, out = _run({"send_images": False}, seed_source, make_result)
    assert out["images"] == [] and len(json.loads(out["info"])["infotexts"]) == 1


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_samples_format_per_request(fmt, pil, seed_source, make_result):
    _, _, out = _run({"override_settings": {"samples_format": fmt}}, seed_source, make_result)
    assert Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).format == pil


def test_enable_pnginfo_off_leaves_no_chunk(seed_source, make_result):
    options = default_options() | {"enable_pnginfo": False}
    _, _, out = _run({}, seed_source, make_result, options)
    assert "parameters" not in Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).info


def test_hires_info(seed_source, make_result):
    _, _, out = _run({"enable_hr": True, "denoising_strength": 0.4, "width": 64, "height": 64,
                      "sampler_name": "DPM++ 2M"}, seed_source, make_result)
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.4 and info["width"] == 64
    assert info["extra_generation_params"] == {"Schedule type": "Karras", "Denoising strength": 0.4,
                                               "Hires upscale": 2.0, "Hires upscaler": "Latent"}
    assert "Schedule type: Karras, CFG scale" in info["infotexts"][0]


def test_interrupted_result_with_fewer_images(seed_source, make_result):
    _, _, out = _run({"batch_size": 3, "seed": 10}, seed_source, make_result, count=1, interrupted=True)
    info = json.loads(out["info"])
    assert info["all_seeds"] == [10, 11, 12] and len(info["infotexts"]) == 1 and len(out["images"]) == 1


def test_no_images_at_all_still_has_every_key(seed_source, make_result):
    _, _, out = _run({}, seed_source, make_result, count=0)
    assert list(json.loads(out["info"])) == INFO_KEYS and out["images"] == []


def test_img2img_response_nulls_init_images_unless_asked(seed_source, make_result, decoder, make_png):
    for include in (False, True):
        body = {"init_images": [make_png()], "mask": make_png(), "include_init_images": include}
        req = Img2ImgRequest.model_validate(body)
        gen = img2img_request(req, default_options(), default_size=(16, 16), random_seed=seed_source,
                              decode=decoder)
        out = generation_response(req, gen, make_result(gen), default_options(), job_timestamp="1", version="v")
        assert (out["parameters"]["init_images"] is None) is not include
        assert (out["parameters"]["mask"] is None) is not include
        info = json.loads(out["info"])
        assert info["denoising_strength"] == 0.75
        assert "Denoising strength: 0.75" in info["infotexts"][0]
        assert "Inpaint area: Only masked" in info["infotexts"][0]


def test_save_images_prepends_a1111_grid(seed_source, make_result):
    _, _, out = _run({"batch_size": 2, "n_iter": 2, "seed": 7, "save_images": True, "width": 16, "height": 8},
                     seed_source, make_result)
    info = json.loads(out["info"])
    assert info["index_of_first_image"] == 1 and len(out["images"]) == 5 == len(info["infotexts"])
    grid = Image.open(io.BytesIO(base64.b64decode(out["images"][0])))
    assert grid.size == (32, 16)  # 4 images: round(sqrt(4)) = 2 rows, 2 columns
    assert grid.info["parameters"] == info["infotexts"][0] and "Seed: 7," in info["infotexts"][0]
    assert "Seed: 7," in info["infotexts"][1] and "Seed: 10," in info["infotexts"][4]


def test_no_grid_without_save_images_or_for_one_image(seed_source, make_result):
    _, _, out = _run({"batch_size": 2}, seed_source, make_result)
    assert json.loads(out["info"])["index_of_first_image"] == 0 and len(out["images"]) == 2
    _, _, out = _run({"save_images": True}, seed_source, make_result)
    assert len(out["images"]) == 1
    options = default_options() | {"return_grid": False}
    _, _, out = _run({"batch_size": 2, "save_images": True}, seed_source, make_result, options)
    assert len(out["images"]) == 2


def test_png_info_of_own_output_round_trips_into_the_same_request(seed_source, make_result):
    """issue 5: /png-info of sdserver's output parses back to the request's fields (via the infotext field)."""
    from sdserver.api.a1111.infotext import png_info

    body = {"prompt": "a fox, (red:1.2)\nsecond line", "negative_prompt": "blurry, bad", "seed": 321,
            "sampler_name": "Euler a", "scheduler": "karras", "steps": 13, "cfg_scale": 4.5,
            "width": 48, "height": 32, "subseed": 5, "subseed_strength": 0.3,
            "override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337}}
    _, gen, out = _run(body, seed_source, make_result)
    parsed = png_info(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))))
    assert parsed["parameters"]["Prompt"] == body["prompt"]
    again = txt2img_request(Txt2ImgRequest.model_validate({"infotext": parsed["info"]}), default_options(),
                            default_size=(64, 64), random_seed=seed_source)
    assert again == gen


def test_hires_request_round_trips_through_its_infotext(seed_source, make_result):
    body = {"prompt": "castle", "seed": 9, "sampler_name": "DPM++ 2M SDE", "steps": 8, "width": 32, "height": 48,
            "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.35, "hr_second_pass_steps": 3,
            "hr_sampler_name": "Euler", "hr_prompt": "castle, detailed", "hr_upscaler": "Latent (bicubic)"}
    _, gen, out = _run(body, seed_source, make_result)
    text = json.loads(out["info"])["infotexts"][0]
    again = txt2img_request(Txt2ImgRequest.model_validate({"infotext": text}), default_options(),
                            default_size=(64, 64), random_seed=seed_source)
    assert again.hires == gen.hires
    # the subseed is unused at strength 0, so the infotext leaves it out and a fresh random one is drawn
    assert replace(again, seeds=replace(again.seeds, subseed=gen.seeds.subseed)) == gen
