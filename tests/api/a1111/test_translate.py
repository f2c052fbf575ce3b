import pytest

from sdserver.api.a1111.options import default_options
from sdserver.api.a1111.schemas import Img2ImgRequest, Txt2ImgRequest
from sdserver.api.a1111.styles import PromptStyle
from sdserver.api.a1111.translate import Limits, img2img_request, merge_prompt, strip_comments, txt2img_request
from sdserver.engine.types import NoiseSource
from sdserver.errors import InvalidImage, InvalidRequest, UnknownSampler, UnsupportedFeature

NATIVE = (256, 384)

FULL_BODY = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "DPM++ 2M Karras", "scheduler": None,
    "batch_size": 2, "n_iter": 3, "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
    "negative_prompt": "ugly", "eta": None, "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False, "comments": {},
    "firstpass_image": None, "sampler_index": "Euler a", "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "force_task_id": None, "infotext": None,
    # keys A1111 does not know: clients send their own objects along
    "use_deprecated_controlnet": False, "use_async": False, "url": "http://127.0.0.1:7860",
    "auth": {"user": "u", "password": "p"},
}


def t2i(body, seed_source, options=None, **kwargs):
    req = Txt2ImgRequest.model_validate(body)
    return txt2img_request(req, options or default_options(), default_size=NATIVE, random_seed=seed_source,
                           **kwargs)


def test_minimal_body(seed_source):
    gen = t2i({"prompt": "a cat", "width": 64, "height": 128, "steps": 3}, seed_source)
    assert (gen.prompt, gen.negative_prompt, gen.width, gen.height) == ("a cat", "", 64, 128)
    assert (gen.sampling.sampler, gen.sampling.scheduler, gen.sampling.steps) == ("euler", "automatic", 3)
    assert gen.sampling.cfg_scale == 7.0
    assert (gen.seeds.seed, gen.seeds.subseed) == (1000, 1001)
    assert gen.seeds.noise_source is NoiseSource.CPU
    assert (gen.batch_size, gen.n_iter, gen.clip_skip, gen.hires, gen.checkpoint) == (1, 1, 1, None, None)


def test_empty_body_takes_a1111_defaults_and_native_size(seed_source):
    gen = t2i({}, seed_source)
    assert (gen.width, gen.height) == NATIVE
    assert gen.sampling.steps == 50 and gen.sampling.sampler == "euler"


def test_explicit_null_size_means_native_but_512_means_512(seed_source):
    assert (t2i({"width": None, "height": None}, seed_source).width) == NATIVE[0]
    gen = t2i({"width": 512, "height": "512"}, seed_source)
    assert (gen.width, gen.height) == (512, 512)


def test_full_body_with_nulls_and_unknown_keys(seed_source):
    gen = t2i(FULL_BODY, seed_source)
    assert gen.sampling.sampler == "dpmpp_2m" and gen.sampling.scheduler == "automatic"
    assert (gen.batch_size, gen.n_iter, gen.image_count) == (2, 3, 6)
    assert gen.negative_prompt == "ugly" and gen.hires is None
    assert gen.sampling.s_tmax == 0.0 and gen.sampling.s_noise == 1.0
    assert gen.seeds.seed == 1000


def test_lax_coercion(seed_source):
    gen = t2i({"steps": "20", "cfg_scale": "5", "tiling": "true", "seed": "77", "sampler_index": "Heun"},
              seed_source)
    assert gen.sampling.steps == 20 and gen.sampling.cfg_scale == 5.0 and gen.tiling is True
    assert gen.seeds.seed == 77 and gen.sampling.sampler == "heun"


@pytest.mark.parametrize("seed", [-1, None, ""])
def test_random_seed(seed, seed_source):
    assert t2i({"seed": seed}, seed_source).seeds.seed == 1000


def test_seed_kept_and_bad_seed_refused(seed_source):
    assert t2i({"seed": 4294967295, "subseed": 5}, seed_source).seeds.subseed == 5
    with pytest.raises(InvalidRequest) as err:
        t2i({"seed": -5}, seed_source)
    assert err.value.field == "seed"


def test_unknown_sampler_is_refused(seed_source):
    with pytest.raises(UnknownSampler):
        t2i({"sampler_name": "Euler z"}, seed_source)


def test_options_and_override_settings(seed_source):
    options = default_options() | {"eta_noise_seed_delta": 31337, "s_churn": 0.5}
    gen = t2i({"override_settings": {"CLIP_stop_at_last_layers": "2", "randn_source": "gpu",
                                     "sd_model_checkpoint": "model.safetensors [abc]", "sd_vae": "vae.pt",
                                     "emphasis": "No norm", "sigma_max": 10}}, seed_source, options)
    assert gen.clip_skip == 2
    assert gen.seeds.noise_source is NoiseSource.GPU
    assert gen.seeds.eta_noise_seed_delta == 31337
    assert gen.sampling.s_churn == 0.5 and gen.sampling.sigma_max == 10.0
    assert gen.checkpoint == "model.safetensors [abc]" and gen.vae == "vae.pt"
    assert gen.emphasis == "No norm"
    # the request's own field beats the option
    assert t2i({"s_churn": 0.1}, seed_source, options).sampling.s_churn == 0.1


def test_sdnext_clip_skip_field(seed_source):
    assert t2i({"clip_skip": 3}, seed_source).clip_skip == 3


def test_bad_override_value_names_the_key(seed_source):
    with pytest.raises(InvalidRequest) as err:
        t2i({"override_settings": {"randn_source": "quantum"}}, seed_source)
    assert err.value.field == "override_settings.randn_source"


def test_eta_comes_from_the_matching_option(seed_source):
    from sdserver.api.a1111.infotext import effective_eta

    options = default_options() | {"eta_ancestral": 0.8, "eta_ddim": 0.2}
    gen = t2i({"sampler_name": "Euler a"}, seed_source, options)
    assert gen.sampling.eta is None and (gen.sampling.eta_ancestral, gen.sampling.eta_ddim) == (0.8, 0.2)
    assert effective_eta(gen.sampling) == 0.8
    assert effective_eta(t2i({"sampler_name": "DDIM"}, seed_source, options).sampling) == 0.2
    assert t2i({"sampler_name": "DDIM", "eta": 0.5}, seed_source, options).sampling.eta == 0.5
    assert effective_eta(t2i({"sampler_name": "DDIM", "eta": 0.5}, seed_source, options).sampling) == 0.5


def test_styles(seed_source):
    styles = {"wrap": PromptStyle("wrap", "masterpiece, {prompt}, 8k", "blurry"),
              "tail": PromptStyle("tail", "oil painting", "")}
    gen = t2i({"prompt": "a cat", "negative_prompt": "ugly", "styles": ["wrap", "tail"]}, seed_source,
              styles=styles)
    assert gen.prompt == "masterpiece, a cat, 8k, oil painting"
    assert gen.negative_prompt == "ugly, blurry"
    with pytest.raises(InvalidRequest) as err:
        t2i({"styles": ["missing"]}, seed_source, styles=styles)
    assert err.value.field == "styles" and "wrap" in err.value.message


def test_merge_prompt_rule():
    assert merge_prompt("a {prompt} b", "X") == "a X b"
    assert merge_prompt("style", "") == "style"
    assert merge_prompt("", "prompt ") == "prompt"


def test_prompt_comments_are_stripped(seed_source):
    assert strip_comments("# note\na cat # inline\nwith hat") == "a cat \nwith hat"
    gen = t2i({"prompt": "a cat # secret"}, seed_source)
    assert gen.prompt == "a cat "
    off = default_options() | {"enable_prompt_comments": False}
    assert t2i({"prompt": "a # b"}, seed_source, off).prompt == "a # b"


def test_hires_fields(seed_source):
    gen = t2i({"enable_hr": True, "width": 64, "height": 64, "hr_scale": 1.5, "hr_sampler_name": "DPM++ 2M",
               "hr_second_pass_steps": 4, "hr_prompt": "sharp"}, seed_source)
    assert gen.hires is not None
    assert gen.hires.denoising_strength == 0.7  # A1111 would fail with a 500 here
    assert (gen.hires.scale, gen.hires.sampler, gen.hires.second_pass_steps) == (1.5, "dpmpp_2m", 4)
    assert gen.hires.upscaler == "Latent" and gen.hires.prompt == "sharp"
    assert t2i({"enable_hr": False, "hr_scale": 4}, seed_source).hires is None


def test_firstphase_legacy_semantics(seed_source):
    gen = t2i({"enable_hr": True, "width": 128, "height": 96, "firstphase_width": 64, "firstphase_height": 48,
               "denoising_strength": 0.4}, seed_source)
    assert (gen.width, gen.height) == (64, 48)
    assert (gen.hires.resize_x, gen.hires.resize_y, gen.hires.denoising_strength) == (128, 96, 0.4)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"steps": 0}, "steps"), ({"steps": 151}, "steps"), ({"width": 5000}, "width"), ({"height": 4}, "height"),
        ({"batch_size": 8, "n_iter": 9}, "batch_size"), ({"n_iter": 0}, "n_iter"), ({"cfg_scale": 1000}, "cfg_scale"),
        ({"prompt": "x" * 20001}, "prompt"), ({"subseed_strength": 2}, "subseed_strength"),
        ({"enable_hr": True, "width": 2048, "height": 2048, "hr_scale": 4}, "hr_scale"),
        ({"enable_hr": True, "width": 64, "height": 64, "hr_resize_x": 8192}, "hr_resize_x"),
        ({"enable_hr": True, "hr_scale": 0}, "hr_scale"),
        ({"enable_hr": True, "denoising_strength": 1.5}, "denoising_strength"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "CLIP_stop_at_last_layers"),
    ],
)
def test_limits_name_the_field(body, field, seed_source):
    with pytest.raises(InvalidRequest) as err:
        t2i(body, seed_source)
    assert err.value.field == field and err.value.status_code == 422


def test_limits_are_configurable(seed_source):
    gen = t2i({"steps": 300}, seed_source, limits=Limits(max_steps=500))
    assert gen.sampling.steps == 300


def test_alwayson_scripts_and_script_name(seed_source):
    assert t2i({"alwayson_scripts": {"ControlNet": {"args": []}}}, seed_source).prompt == ""
    with pytest.raises(InvalidRequest) as err:
        t2i({"alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face"}]}}}, seed_source)
    assert "always on script ADetailer not found" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        t2i({"script_name": "X/Y/Z plot"}, seed_source)
    assert err.value.message == "Script 'X/Y/Z plot' not found" and err.value.field == "script_name"


def test_unsupported_features_are_422(seed_source):
    with pytest.raises(UnsupportedFeature) as err:
        t2i({"restore_faces": True}, seed_source)
    assert err.value.field == "restore_faces"


def test_infotext_field_fills_unset_fields(seed_source):
    text = "a fox\nNegative prompt: bad\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 4.5, " \
           "Seed: 99, Size: 64x96, Clip skip: 2, RNG: NV"
    gen = t2i({"infotext": text, "steps": 5}, seed_source)
    assert (gen.prompt, gen.negative_prompt, gen.sampling.steps) == ("a fox", "bad", 5)
    assert (gen.sampling.sampler, gen.sampling.scheduler, gen.sampling.cfg_scale) == ("dpmpp_2m", "exponential", 4.5)
    assert (gen.seeds.seed, gen.width, gen.height, gen.clip_skip) == (99, 64, 96, 2)
    assert gen.seeds.noise_source is NoiseSource.NV


# ---- img2img ----------------------------------------------------------------------------------------------


def i2i(body, seed_source, decoder, **kwargs):
    req = Img2ImgRequest.model_validate(body)
    return img2img_request(req, default_options(), default_size=NATIVE, random_seed=seed_source, decode=decoder,
                           **kwargs)


def test_img2img_raw_and_data_url_images(seed_source, decoder, make_png):
    raw = make_png((32, 32))
    gen = i2i({"init_images": [raw], "width": 32, "height": 32}, seed_source, decoder)
    assert gen.is_img2img and gen.init_images[0].size == (32, 32) and gen.init_images[0].mode == "RGB"
    assert gen.denoising_strength == 0.75 and gen.inpaint is None and gen.initial_noise_multiplier == 1.0
    gen = i2i({"init_images": ["data:image/png;base64," + raw], "mask": "data:image/png;base64," + make_png(
        (32, 32), 255, mode="L"), "mask_blur": 2, "inpainting_fill": 1}, seed_source, decoder)
    assert gen.inpaint is not None and gen.inpaint.mask.mode == "L"
    assert (gen.inpaint.mask_blur_x, gen.inpaint.mask_blur_y, gen.inpaint.fill) == (2, 2, 1)
    assert gen.inpaint.full_res is True and gen.inpaint.full_res_padding == 0  # A1111's API defaults


def test_img2img_transparent_init_is_flattened_and_rgba_mask_uses_alpha(seed_source, decoder, make_png):
    init = make_png((8, 8), (0, 0, 0, 0), mode="RGBA")
    mask = make_png((8, 8), (0, 0, 0, 0), mode="RGBA")
    gen = i2i({"init_images": [init], "mask": mask}, seed_source, decoder)
    assert gen.init_images[0].getpixel((0, 0)) == (255, 255, 255)
    assert gen.inpaint.mask.getpixel((0, 0)) == 0


def test_img2img_requires_an_image(seed_source, decoder):
    for body in ({}, {"init_images": None}, {"init_images": []}):
        with pytest.raises(InvalidImage) as err:
            i2i(body, seed_source, decoder)
        assert err.value.field == "init_images"


def test_img2img_corrupt_image_names_the_index(seed_source, decoder, make_png):
    with pytest.raises(InvalidImage) as err:
        i2i({"init_images": [make_png(), "bm90IGFuIGltYWdl"], "batch_size": 2}, seed_source, decoder)
    assert err.value.field == "init_images[1]"


def test_img2img_several_images_make_the_batch(seed_source, decoder, make_png):
    gen = i2i({"init_images": [make_png(), make_png()], "batch_size": 4}, seed_source, decoder)
    assert gen.batch_size == 2
    with pytest.raises(InvalidRequest) as err:
        i2i({"init_images": [make_png()] * 3, "batch_size": 2}, seed_source, decoder)
    assert err.value.field == "init_images"


def test_img2img_fields(seed_source, decoder, make_png):
    gen = i2i({"init_images": [make_png()], "denoising_strength": 0.3, "resize_mode": 2,
               "initial_noise_multiplier": 0.9, "override_settings": {"img2img_fix_steps": True}},
              seed_source, decoder)
    assert (gen.denoising_strength, gen.resize_mode, gen.initial_noise_multiplier) == (0.3, 2, 0.9)
    assert gen.img2img_fix_steps is True and gen.inpainting_mask_weight == 1.0
    gen = i2i({"init_images": [make_png()], "override_settings": {"inpainting_mask_weight": "0.5"}},
              seed_source, decoder)
    assert gen.inpainting_mask_weight == 0.5
    with pytest.raises(InvalidRequest) as err:
        i2i({"init_images": [make_png()], "resize_mode": 7}, seed_source, decoder)
    assert err.value.field == "resize_mode"
