import numpy as np
import pytest
from PIL import Image

from sdserver.errors import InvalidRequest
from sdserver.pipeline.extras import ExtrasParams, run_extras
from sdserver.upscalers.registry import UpscalerRegistry


@pytest.fixture
def registry(tmp_path):
    return UpscalerRegistry({"ESRGAN": [tmp_path / "ESRGAN"]})


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("field", ["gfpgan_visibility", "codeformer_visibility"])
def test_face_restoration_is_refused(registry, field):
    with pytest.raises(InvalidRequest) as err:
        run_extras(_image(8, 8), ExtrasParams(upscaler_1="Lanczos", **{field: 0.5}), registry)
    assert err.value.field == field
    assert "face restorer" in err.value.message


def test_zero_face_visibility_is_fine(registry):
    out, _ = run_extras(_image(8, 8), ExtrasParams(upscaler_1="Lanczos", codeformer_weight=0.7), registry)
    assert out.size == (16, 16)


def test_scale_by_rounds_sides_down_to_multiples_of_8(registry):
    img = _image(15, 10)
    out, html_info = run_extras(img, ExtrasParams(upscaling_resize=2.5, upscaler_1="Lanczos"), registry)
    assert out.size == (32, 24)  # 37.5 x 25, each side rounded down to a multiple of 8 as A1111
    assert html_info == "<p>Postprocess upscale by: 2.5, Postprocess upscaler: Lanczos</p>"


def test_scale_to_with_crop_is_centred(registry):
    img = _image(30, 20)
    params = ExtrasParams(resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64, upscaler_1="Nearest")
    out, html_info = run_extras(img, params, registry)
    assert out.size == (64, 64)
    assert html_info == (
        "<p>Postprocess upscale to: 64x64, Postprocess crop to: 64x64, Postprocess upscaler: Nearest</p>"
    )
    # Scale max(64/30, 64/20) = 3.2 gives 96x64; the crop keeps columns 16..80.
    full = img.resize((96, 64), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(out), np.asarray(full)[:, 16:80])


def test_scale_to_without_crop_covers_the_box(registry):
    params = ExtrasParams(resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64, upscaling_crop=False,
                          upscaler_1="Lanczos")
    out, html_info = run_extras(_image(30, 20), params, registry)
    assert out.size == (96, 64)
    assert "crop" not in html_info


def test_upscaler_none_leaves_the_image(registry):
    img = _image(12, 9)
    out, html_info = run_extras(img, ExtrasParams(upscaler_1="None", upscaler_2="Lanczos",
                                                  extras_upscaler_2_visibility=1), registry)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    assert html_info == "<p></p>"


def test_upscaler_2_is_blended(registry):
    img = _image(12, 12)
    params = ExtrasParams(upscaler_1="Nearest", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.3)
    out, html_info = run_extras(img, params, registry)
    nearest = img.resize((24, 24), Image.Resampling.NEAREST)
    lanczos = img.resize((24, 24), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(Image.blend(nearest, lanczos, 0.3)))
    assert html_info.endswith("Postprocess upscaler: Nearest, Postprocess upscaler 2: Lanczos</p>")


def test_upscaler_2_invisible_is_skipped(registry):
    img = _image(12, 12)
    out, html_info = run_extras(img, ExtrasParams(upscaler_1="Nearest", upscaler_2="Lanczos"), registry)
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((24, 24), Image.Resampling.NEAREST)))
    assert "upscaler 2" not in html_info


@pytest.mark.parametrize("field", ["upscaler_1", "upscaler_2"])
def test_unknown_upscaler_names_the_field(registry, field):
    params = ExtrasParams(**{"upscaler_1": "Lanczos", field: "R-ESRGAN 4x+"})
    with pytest.raises(InvalidRequest) as err:
        run_extras(_image(8, 8), params, registry)
    assert err.value.field == field


@pytest.mark.parametrize("params,field", [
    (ExtrasParams(resize_mode=2, upscaler_1="Lanczos"), "resize_mode"),
    (ExtrasParams(upscaling_resize=0, upscaler_1="Lanczos"), "upscaling_resize"),
    (ExtrasParams(resize_mode=1, upscaling_resize_w=0, upscaler_1="Lanczos"), "upscaling_resize_w"),
    (ExtrasParams(extras_upscaler_2_visibility=1.5, upscaler_1="Lanczos"), "extras_upscaler_2_visibility"),
])
def test_bad_values_name_their_field(registry, params, field):
    with pytest.raises(InvalidRequest) as err:
        run_extras(_image(8, 8), params, registry)
    assert err.value.field == field


def test_text_chunks_are_kept_and_postprocessing_added(registry):
    img = _image(8, 8)
    img.info["parameters"] = "a cat\nSteps: 20, Seed: 1"
    img.info["dpi"] = (72, 72)
    out, _ = run_extras(img, ExtrasParams(upscaler_1="Lanczos"), registry)
    assert out.info == {"parameters": "a cat\nSteps: 20, Seed: 1",
                        "postprocessing": "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"}


class _Fake:
    def has(self, name):
        return True

    def upscale(self, image, scale, name, *, device, dtype, field, multiple):
        return image.resize((int(image.width * scale), int(image.height * scale)))


def test_values_with_separators_are_quoted_and_escaped():
    _, html_info = run_extras(_image(4, 4), ExtrasParams(upscaler_1="x<1>, y"), _Fake())
    assert html_info == '<p>Postprocess upscale by: 2.0, Postprocess upscaler: &quot;x&lt;1&gt;, y&quot;</p>'


def test_rgba_input_becomes_rgb(registry):
    img = Image.new("RGBA", (6, 4), (10, 20, 30, 128))
    out, _ = run_extras(img, ExtrasParams(upscaler_1="Nearest"), registry)
    assert out.mode == "RGB" and out.size == (8, 8)
