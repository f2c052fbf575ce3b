import pytest
from pydantic import ValidationError

from sdserver.api.a1111 import schemas


def test_empty_body_is_valid_with_a1111_api_defaults():
    t = schemas.Txt2ImgRequest.model_validate({})
    assert (t.steps, t.width, t.sampler_index, t.denoising_strength, t.send_images) == (50, 512, "Euler", None, True)
    i = schemas.Img2ImgRequest.model_validate({})
    assert (i.denoising_strength, i.inpainting_fill, i.inpaint_full_res, i.inpaint_full_res_padding) == (
        0.75, 0, True, 0)
    assert i.mask_blur_x == 4 and i.include_init_images is False


def test_nulls_mean_defaults_and_unknown_keys_are_ignored():
    t = schemas.Txt2ImgRequest.model_validate({"send_images": None, "alwayson_scripts": None, "steps": None,
                                               "script_args": None, "hr_sampler_name": None, "bogus": 1})
    assert t.send_images is True and t.alwayson_scripts == {} and t.steps == 50 and t.script_args == []
    assert "steps" not in t.model_fields_set and not hasattr(t, "bogus")


def test_lax_coercion():
    t = schemas.Txt2ImgRequest.model_validate({"steps": "20", "enable_hr": "true", "sampler_index": 0,
                                               "cfg_scale": 7, "seed": "abc", "subseed": 3.0})
    assert t.steps == 20 and t.enable_hr is True and t.sampler_index == "0" and t.cfg_scale == 7.0
    assert t.seed == -1 and t.subseed == 3


def test_wrong_types_still_fail():
    with pytest.raises(ValidationError):
        schemas.Txt2ImgRequest.model_validate({"steps": "many"})


@pytest.mark.parametrize("field,value", [("gfpgan_visibility", 1.5), ("upscaling_resize", 0),
                                         ("upscaling_resize_w", 0), ("resize_mode", 2),
                                         ("extras_upscaler_2_visibility", -0.1)])
def test_extras_constraints(field, value):
    with pytest.raises(ValidationError):
        schemas.ExtrasSingleImageRequest.model_validate({"image": "x", field: value})


def test_extras_minimal_and_batch():
    e = schemas.ExtrasSingleImageRequest.model_validate({"image": "abc"})
    assert e.upscaling_resize == 2 and e.upscaler_1 == "None"
    b = schemas.ExtrasBatchImagesRequest.model_validate({"imageList": [{"data": "a", "name": "n"}]})
    assert b.imageList[0].name == "n"


def test_response_models_dump_every_key():
    assert set(schemas.ProgressResponse().model_dump()) == {"progress", "eta_relative", "state", "current_image",
                                                            "textinfo"}
    assert schemas.InterruptResponse().model_dump() == {}
    assert set(schemas.InternalProgressResponse().model_dump()) == {
        "active", "queued", "completed", "progress", "eta", "live_preview", "id_live_preview", "textinfo"}
    assert schemas.MemoryResponse(ram={}, cuda={"error": "unavailable"}).model_dump()["cuda"] == {
        "error": "unavailable"}


def test_single_style_string_is_a_list():
    assert schemas.Txt2ImgRequest.model_validate({"styles": "cinematic"}).styles == ["cinematic"]
