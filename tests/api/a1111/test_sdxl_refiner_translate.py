"""The refiner at the A1111 edge: request fields → RefinerParams, options, infotext keys and reading them back."""

import pytest

from sdserver.api.a1111.infotext import create_infotext, generation_params, parse_infotext
from sdserver.api.a1111.options import default_options
from sdserver.api.a1111.schemas import Img2ImgRequest, Txt2ImgRequest
from sdserver.api.a1111.translate import img2img_request, txt2img_request
from sdserver.engine.types import GenerationResult, RefinerUse
from sdserver.errors import InvalidRequest


def t2i(body, seed_source, options=None):
    return txt2img_request(Txt2ImgRequest.model_validate(body), options or default_options(), default_size=(64, 64),
                           random_seed=seed_source)


def test_refiner_fields_become_refiner_params(seed_source):
    gen = t2i({"refiner_checkpoint": "sd_xl_refiner_1.0.safetensors [7440042bbd]", "refiner_switch_at": 0.8},
              seed_source)
    assert gen.refiner is not None
    assert (gen.refiner.checkpoint, gen.refiner.switch_at, gen.refiner.by_sampling_steps) == (
        "sd_xl_refiner_1.0.safetensors [7440042bbd]", 0.8, False)
    assert (gen.aesthetic_score, gen.negative_aesthetic_score) == (6.0, 2.5)
    assert t2i({"refiner_checkpoint": "r", "refiner_switch_at": None}, seed_source).refiner.switch_at is None


@pytest.mark.parametrize("name", [None, "", "None", "none"])
def test_no_refiner_values(seed_source, name):
    assert t2i({"refiner_checkpoint": name, "refiner_switch_at": 0.8}, seed_source).refiner is None


def test_options_reach_the_refiner(seed_source):
    options = {**default_options(), "refiner_switch_by_sample_steps": True,
               "sdxl_refiner_high_aesthetic_score": 7.5, "sdxl_refiner_low_aesthetic_score": 1.0}
    gen = t2i({"refiner_checkpoint": "r", "refiner_switch_at": 0.5}, seed_source, options)
    assert gen.refiner.by_sampling_steps and (gen.aesthetic_score, gen.negative_aesthetic_score) == (7.5, 1.0)


def test_switch_point_out_of_range_is_a_422(seed_source):
    with pytest.raises(InvalidRequest) as err:
        t2i({"refiner_checkpoint": "r", "refiner_switch_at": 1.5}, seed_source)
    assert err.value.field == "refiner_switch_at"


def test_img2img_takes_the_refiner_too(seed_source, make_png, decoder):
    req = Img2ImgRequest.model_validate({"init_images": [make_png()], "refiner_checkpoint": "r",
                                         "refiner_switch_at": 0.25})
    gen = img2img_request(req, default_options(), default_size=(64, 64), random_seed=seed_source, decode=decoder)
    assert gen.refiner is not None and gen.refiner.switch_at == 0.25


def _params(gen, refiner):
    result = GenerationResult(images=(), model_name="sd_xl_base_1.0", model_hash="31e35c80fc", refiner=refiner)
    return generation_params(gen, result, default_options(), seed=1, subseed=0, version="v1.10.1")


def test_infotext_writes_the_refiner_as_a1111(seed_source):
    gen = t2i({"prompt": "a cat", "refiner_checkpoint": "r", "refiner_switch_at": 0.8, "eta": 0.5,
               "sampler_name": "Euler a"}, seed_source)
    params = _params(gen, RefinerUse("sd_xl_refiner_1.0", "7440042bbd", 0.8))
    keys = list(params)
    assert params["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]" and params["Refiner switch at"] == 0.8
    assert keys.index("Eta") < keys.index("Refiner") < keys.index("Refiner switch at") < keys.index("Version")
    text = create_infotext("a cat", "", params)
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1" in text
    parsed = parse_infotext(text)
    assert (parsed["Refiner"], parsed["Refiner switch at"]) == ("sd_xl_refiner_1.0 [7440042bbd]", "0.8")
    # No switch (or no refiner): no keys.
    assert "Refiner" not in _params(gen, None)
    by_steps = _params(gen, RefinerUse("r", None, 0.5, by_sampling_steps=True))
    assert by_steps["Refiner"] == "r" and by_steps["Refiner switch by sampling steps"] is True


def test_infotext_in_the_request_fills_the_refiner(seed_source):
    text = "a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, " \
           "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.7"
    gen = t2i({"infotext": text}, seed_source)
    assert gen.refiner.checkpoint == "sd_xl_refiner_1.0 [7440042bbd]" and gen.refiner.switch_at == 0.7


def test_hires_refiner_pass_option(seed_source):
    options = {**default_options(), "hires_fix_refiner_pass": "both passes"}
    gen = t2i({"enable_hr": True, "refiner_checkpoint": "r", "refiner_switch_at": 0.5}, seed_source, options)
    assert gen.refiner.hires_pass == "both passes" and gen.hires is not None
    assert t2i({"refiner_checkpoint": "r"}, seed_source).refiner.hires_pass == "second pass"
    with pytest.raises(InvalidRequest) as err:
        t2i({"refiner_checkpoint": "r"}, seed_source, {**default_options(), "hires_fix_refiner_pass": "third"})
    assert err.value.field == "override_settings.hires_fix_refiner_pass"
    params = _params(gen, RefinerUse("r", "0123456789", 0.5, hires_pass="both passes"))
    keys = list(params)
    assert params["Hires refiner"] == "both passes" and keys.index("Hires refiner") < keys.index("Refiner")
