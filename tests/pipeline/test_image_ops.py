import numpy as np
import pytest
import torch
from PIL import Image

from sdserver.pipeline import image_ops as ops


def _noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode)


def _blob_mask(w, h, box):
    arr = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr, "L")


# -- resize --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("src,dst", [((40, 20), (32, 32)), ((20, 40), (48, 24)), ((30, 30), (17, 23))])
def test_resize_modes_give_the_target_size(mode, src, dst):
    assert ops.resize_image(mode, _noise(*src), *dst).size == dst


def test_mode_1_crops_centred():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    out = np.asarray(ops.resize_image(1, Image.fromarray(arr), 20, 20))
    assert (out == (0, 255, 0)).all()


def test_mode_2_fills_bars_with_stretched_edges():
    arr = np.full((20, 40, 3), (0, 255, 0), dtype=np.uint8)
    arr[0] = (255, 0, 0)
    arr[-1] = (0, 0, 255)
    out = np.asarray(ops.resize_image(2, Image.fromarray(arr), 40, 40))
    assert (out[:10] == (255, 0, 0)).all()
    assert (out[10:30] == arr).all()
    assert (out[30:] == (0, 0, 255)).all()


def test_mode_2_fills_side_bars():
    arr = np.full((40, 20, 3), (0, 255, 0), dtype=np.uint8)
    arr[:, 0] = (255, 0, 0)
    arr[:, -1] = (0, 0, 255)
    out = np.asarray(ops.resize_image(2, Image.fromarray(arr), 40, 40))
    assert (out[:, :10] == (255, 0, 0)).all() and (out[:, 30:] == (0, 0, 255)).all()


def test_upscaler_runs_only_when_enlarging_colour_images():
    calls = []

    def upscaler(img, scale):
        calls.append(scale)
        return img.resize((int(img.width * scale), int(img.height * scale)), Image.Resampling.NEAREST)

    ops.resize_image(0, _noise(10, 10), 30, 20, upscaler)
    ops.resize_image(0, _noise(10, 10), 8, 8, upscaler)
    ops.resize_image(0, _noise(10, 10, mode="L"), 30, 30, upscaler)
    assert calls == [3.0]


# -- conversions ---------------------------------------------------------------------------------------------


def test_flatten_alpha_uses_background():
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    img.putpixel((1, 0), (10, 20, 30, 0))
    out = ops.flatten_alpha(img, "#ff0000")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (255, 0, 0)


def test_tensor_to_pil_truncates_and_clamps():
    x = torch.tensor([0.999, 0.5, -0.2, 1.3]).view(1, 1, 4).expand(3, 1, 4)
    assert list(np.asarray(ops.tensor_to_pil(x))[0, :, 0]) == [254, 127, 0, 255]


def test_pil_tensor_round_trip_shape_and_range():
    img = _noise(5, 3)
    t = ops.pil_to_tensor(img)
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    back = np.asarray(ops.tensor_to_pil(t)).astype(int)
    assert np.abs(back - np.asarray(img)).max() <= 1


def test_decoded_to_pils_maps_minus_one_to_one():
    batch = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])
    a, b = ops.decoded_to_pils(batch)
    assert a.getpixel((0, 0)) == (0, 0, 0) and b.getpixel((0, 0)) == (255, 255, 255)


# -- masks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,size", [(0.5, 3), (1, 7), (4, 21), (64, 321)])
def test_kernel_size(sigma, size):
    assert ops.gaussian_kernel_size(sigma) == size


@pytest.mark.parametrize("sigma", [1, 4])
def test_blur_reaches_exactly_the_kernel_radius_per_axis(sigma):
    radius = ops.gaussian_kernel_size(sigma) // 2
    arr = np.zeros((41, 41), dtype=np.uint8)
    arr[20, 20] = 255
    x_only = np.asarray(ops.prepare_mask(Image.fromarray(arr), invert=False, blur_x=sigma, blur_y=0, round=True))
    nonzero_cols = np.flatnonzero(x_only[20])
    assert (nonzero_cols.min(), nonzero_cols.max()) == (20 - radius, 20 + radius)
    assert not x_only[np.arange(41) != 20].any()
    y_only = np.asarray(ops.prepare_mask(Image.fromarray(arr), invert=False, blur_x=0, blur_y=sigma, round=True))
    assert np.array_equal(y_only, x_only.T)


def test_blur_is_gaussian_shaped():
    arr = np.zeros((1, 61), dtype=np.uint8)
    arr[0, 30] = 255
    out = np.asarray(ops.prepare_mask(Image.fromarray(arr), invert=False, blur_x=4, blur_y=0, round=True))[0]
    expected = 255 * np.exp(-((np.arange(61) - 30) ** 2) / 32.0)
    expected[np.abs(np.arange(61) - 30) > 10] = 0
    expected = expected / np.exp(-(np.arange(-10, 11) ** 2) / 32.0).sum()
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_alpha_mask_thresholds_when_round():
    rgba = Image.new("RGBA", (3, 1))
    for x, a in enumerate((100, 129, 255)):
        rgba.putpixel((x, 0), (0, 0, 0, a))
    rounded = ops.prepare_mask(rgba, invert=False, blur_x=0, blur_y=0, round=True)
    raw = ops.prepare_mask(rgba, invert=False, blur_x=0, blur_y=0, round=False)
    assert list(np.asarray(rounded)[0]) == [0, 255, 255]
    assert list(np.asarray(raw)[0]) == [100, 129, 255]


def test_rgb_mask_and_invert():
    mask = Image.new("RGB", (2, 1), (255, 255, 255))
    mask.putpixel((1, 0), (0, 0, 0))
    assert list(np.asarray(ops.prepare_mask(mask, invert=True, blur_x=0, blur_y=0, round=True))[0]) == [0, 255]


def test_latent_mask_size_and_rounding():
    mask = _blob_mask(64, 32, (0, 0, 20, 32))
    soft = ops.latent_mask(mask, 8, 4, round=False)
    hard = ops.latent_mask(mask, 8, 4, round=True)
    assert soft.shape == hard.shape == (4, 8)
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert hard[0, 0] == 1.0 and hard[0, 7] == 0.0
    assert 0 < soft[0, 2] < 1  # column 2 straddles the mask's edge at x=20


def test_crop_region_pads_and_clips():
    mask = _blob_mask(64, 48, (10, 5, 20, 30))
    assert ops.crop_region(mask, 0) == (10, 5, 20, 30)
    assert ops.crop_region(mask, 8) == (2, 0, 28, 38)
    assert ops.crop_region(Image.new("L", (8, 8)), 4) is None


def test_expand_to_aspect_matches_processing_ratio():
    assert ops.expand_to_aspect((100, 200, 228, 232), 512, 512, 512, 512) == (100, 152, 228, 280)
    # Near the top: shifted down to stay inside.
    assert ops.expand_to_aspect((100, 0, 228, 32), 512, 512, 512, 512) == (100, 0, 228, 128)
    # Taller region, wide processing size, near the right edge.
    assert ops.expand_to_aspect((490, 10, 510, 30), 64, 32, 512, 512) == (472, 10, 512, 30)


def test_overlay_keeps_unmasked_pixels_exactly():
    original, generated = _noise(48, 40, seed=1), _noise(48, 40, seed=2)
    mask = ops.prepare_mask(_blob_mask(48, 40, (12, 12, 36, 28)), invert=False, blur_x=2, blur_y=2, round=True)
    out = np.asarray(ops.apply_overlay(generated, original, mask))
    m = np.asarray(mask)
    assert (out[m == 0] == np.asarray(original)[m == 0]).all()
    assert (out[m == 255] == np.asarray(generated)[m == 255]).all()
    assert (m == 255).any() and (m == 0).any()


def test_mask_for_overlay_doubles_for_whole_picture():
    mask = Image.fromarray(np.array([[0, 60, 128, 200]], dtype=np.uint8), "L")
    assert list(np.asarray(ops.mask_for_overlay(mask, full_res=False))[0]) == [0, 120, 255, 255]
    assert list(np.asarray(ops.mask_for_overlay(mask, full_res=True))[0]) == [0, 60, 128, 200]


def test_only_masked_crop_and_paste_back():
    original = _noise(80, 60, seed=3)
    mask = ops.prepare_mask(_blob_mask(80, 60, (25, 15, 50, 40)), invert=False, blur_x=4, blur_y=4, round=True)
    region = ops.crop_region(mask, 2)
    assert region == (13, 3, 62, 52)  # the blurred mask reaches 10 px (the kernel radius) past the blob
    region = ops.expand_to_aspect(region, 32, 32, 80, 60)
    x1, y1, x2, y2 = region
    assert x2 - x1 == y2 - y1
    crop = ops.resize_image(2, original.crop(region), 32, 32)
    assert crop.size == (32, 32)
    generated = _noise(32, 32, seed=4)
    out = ops.paste_back(original, generated, region, mask)
    assert out.size == original.size
    m = np.asarray(mask)
    assert (np.asarray(out)[m == 0] == np.asarray(original)[m == 0]).all()
    assert (np.asarray(out)[m == 255] != np.asarray(original)[m == 255]).any()


def test_fill_replaces_masked_content_with_surrounding_colour():
    arr = np.zeros((40, 40, 3), dtype=np.uint8)
    arr[:, :20] = (200, 30, 30)
    arr[:, 20:] = (30, 30, 200)
    arr[10:15, 5:10] = (0, 255, 0)  # content that fill must erase
    image = Image.fromarray(arr)
    mask = _blob_mask(40, 40, (2, 6, 14, 18))
    out = np.asarray(ops.fill_masked(image, mask)).astype(int)
    m = np.asarray(mask)
    assert (out[m == 0] == arr[m == 0]).all()
    inside = out[m == 255]
    assert (inside[:, 0] > inside[:, 2]).all()  # reddish, from the left half around it
    assert (inside[:, 1] < 120).all()  # the green patch is gone


# -- composition ---------------------------------------------------------------------------------------------


def test_prepare_without_mask_is_plain_resize():
    prepared = ops.prepare_img2img_images([_noise(40, 30)], 32, 24, resize_mode=1)
    assert [i.size for i in prepared.images] == [(32, 24)]
    assert prepared.mask is None and prepared.overlays is None
    generated = _noise(32, 24, seed=9)
    assert ops.finish_img2img_image(generated, prepared, 0) is generated


def test_prepare_resize_mode_3_leaves_the_image_for_latent_resizing():
    prepared = ops.prepare_img2img_images([_noise(40, 30)], 64, 48, resize_mode=3)
    assert prepared.images[0].size == (40, 30)


def test_whole_picture_inpaint_keeps_pixels_outside_the_doubled_mask():
    init = _noise(64, 48, seed=5)
    raw = _blob_mask(64, 48, (20, 12, 44, 36))
    prepared = ops.prepare_img2img_images([init], 64, 48, mask=raw, blur_x=2, blur_y=2)
    assert prepared.mask.size == (64, 48) and prepared.paste_region is None
    out = np.asarray(ops.finish_img2img_image(_noise(64, 48, seed=6), prepared, 0))
    untouched = np.asarray(prepared.mask) == 0
    assert (out[untouched] == np.asarray(init)[untouched]).all()
    assert (out[~untouched] != np.asarray(init)[~untouched]).any()


def test_only_masked_inpaint_round_trip():
    init = _noise(96, 64, seed=7)
    raw = _blob_mask(96, 64, (40, 20, 60, 40))
    prepared = ops.prepare_img2img_images([init, _noise(96, 64, seed=8)], 32, 32, mask=raw, full_res=True,
                                          padding=4, fill=0)
    assert [i.size for i in prepared.images] == [(32, 32), (32, 32)]
    assert prepared.mask.size == (32, 32)
    x1, y1, x2, y2 = prepared.paste_region
    assert x2 - x1 == y2 - y1
    blurred = np.asarray(ops.prepare_mask(raw, invert=False, blur_x=4, blur_y=4, round=True))
    out = ops.finish_img2img_image(_noise(32, 32, seed=10), prepared, 0)
    assert out.size == (96, 64)
    assert (np.asarray(out)[blurred == 0] == np.asarray(init)[blurred == 0]).all()


def test_only_masked_with_blank_mask_falls_back():
    prepared = ops.prepare_img2img_images([_noise(40, 40)], 32, 32, mask=Image.new("L", (40, 40)), full_res=True)
    assert prepared.empty_mask_fallback and prepared.mask is None and prepared.overlays is None
    assert prepared.images[0].size == (32, 32)


def test_fill_with_latent_resize_mode_works_at_the_image_size():
    raw = _blob_mask(40, 30, (10, 10, 30, 20))
    prepared = ops.prepare_img2img_images([_noise(40, 30)], 64, 48, resize_mode=3, mask=raw, fill=0)
    assert prepared.images[0].size == (40, 30) and prepared.mask.size == (64, 48)
