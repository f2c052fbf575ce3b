import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from sdserver.api.a1111.images import decode_image, encode_image, flatten, mask_to_l
from sdserver.errors import InvalidImage, InvalidRequest


def _b64(img: Image.Image, fmt="PNG", **kwargs) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return base64.b64encode(buffer.getvalue()).decode()


def test_raw_and_data_url_base64(make_png):
    raw = make_png((10, 6), (1, 2, 3))
    for data in (raw, "data:image/png;base64," + raw, " " + raw[:20] + "\n" + raw[20:] + " ", raw.rstrip("=")):
        img = decode_image(data, "image", max_pixels=1000)
        assert img.size == (10, 6) and img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("data", ["", "   ", "!!!notbase64!!!", base64.b64encode(b"plain text").decode(),
                                  "data:image/png,abcd", None, 123])
def test_bad_input_names_the_field(data):
    with pytest.raises(InvalidImage) as err:
        decode_image(data, "init_images[0]", max_pixels=1000)
    assert err.value.field == "init_images[0]" and err.value.status_code == 422


def test_truncated_image_is_invalid(make_png):
    data = base64.b64decode(make_png((64, 64)))
    with pytest.raises(InvalidImage):
        decode_image(base64.b64encode(data[: len(data) // 2]).decode(), "mask", max_pixels=10**6)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "https://example.com/a.png", "HTTP://x"])
@pytest.mark.parametrize("allow", [False, True])
def test_urls_are_never_fetched(url, allow):
    with pytest.raises(InvalidImage) as err:
        decode_image(url, "image", max_pixels=1000, allow_remote=allow)
    assert err.value.field == "image"
    assert ("not implemented" in err.value.message) is allow


def _bomb_png(width: int, height: int) -> str:
    """A tiny PNG whose header claims a huge size: only IHDR and a small IDAT, never decodable in full."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


@pytest.mark.parametrize("side", [8000, 100_000])  # over our limit; and over PIL's own bomb limit too
def test_decompression_bomb_refused_from_the_header(side):
    data = _bomb_png(side, side)
    assert len(data) < 200
    with pytest.raises(InvalidImage) as err:
        decode_image(data, "image", max_pixels=4096 * 4096)
    assert err.value.field == "image"
    if side == 8000:
        assert "over the limit" in err.value.message


def test_limit_is_the_callers(make_png):
    data = make_png((100, 100))
    decode_image(data, "image", max_pixels=100 * 100)
    with pytest.raises(InvalidImage):
        decode_image(data, "image", max_pixels=100 * 100 - 1)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(_b64(img, "JPEG", exif=exif.tobytes()), "image", max_pixels=1000)
    assert decoded.size == (10, 20)


def test_encode_png_carries_parameters_and_keeps_other_text():
    img = Image.new("RGB", (4, 4))
    img.info["Software"] = "x"
    data = encode_image(img, "png", "prompt ✓\nSteps: 1")
    assert not data.startswith("data:")
    back = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert back.info["parameters"] == "prompt ✓\nSteps: 1" and back.info["Software"] == "x"


def test_encode_none_keeps_existing_parameters():
    img = Image.open(io.BytesIO(base64.b64decode(encode_image(Image.new("RGB", (4, 4)), "png", "orig"))))
    img.load()
    back = Image.open(io.BytesIO(base64.b64decode(encode_image(img, "png", None))))
    assert back.info["parameters"] == "orig"


def test_encode_jpeg_converts_rgba_and_rejects_unknown_formats():
    data = encode_image(Image.new("RGBA", (4, 4)), "jpeg", None, quality=50)
    assert Image.open(io.BytesIO(base64.b64decode(data))).mode == "RGB"
    with pytest.raises(InvalidRequest) as err:
        encode_image(Image.new("RGB", (4, 4)), "gif", None)
    assert err.value.field == "samples_format"


def test_flatten_and_mask_helpers():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert flatten(rgba, "#000000").getpixel((0, 0)) == (0, 0, 0)
    assert flatten(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    opaque = Image.new("RGBA", (2, 2), (255, 255, 255, 255))
    assert mask_to_l(opaque).getpixel((0, 0)) == 255  # opaque: luminance, not alpha
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 255))
    half.putpixel((0, 0), (0, 0, 0, 0))
    assert mask_to_l(half).getpixel((0, 0)) == 0 and mask_to_l(half).getpixel((1, 1)) == 255


@pytest.mark.parametrize("count,batch,n_rows,prevent,rows", [
    (4, 2, -1, False, 2), (2, 2, -1, False, 1), (3, 3, -1, False, 2), (6, 3, 0, False, 3), (5, 1, 3, False, 3),
    (6, 6, -1, True, 2), (7, 7, -1, True, 1), (2, 1, 5, False, 2),
])
def test_grid_rows(count, batch, n_rows, prevent, rows):
    from sdserver.api.a1111.images import grid_rows

    assert grid_rows(count, batch, n_rows, prevent) == rows


def test_image_grid_layout():
    from sdserver.api.a1111.images import image_grid

    cells = [Image.new("RGB", (4, 2), (i * 50, 0, 0)) for i in range(3)]
    grid = image_grid(cells, rows=2)
    assert grid.size == (8, 4)
    assert grid.getpixel((4, 0)) == (50, 0, 0) and grid.getpixel((0, 2)) == (100, 0, 0)
    assert grid.getpixel((4, 2)) == (0, 0, 0)


def test_only_plain_raster_formats_are_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidImage):
        decode_image(base64.b64encode(eps).decode(), "image", max_pixels=1000)
    for fmt in ("BMP", "GIF", "TIFF", "WEBP", "JPEG"):
        assert decode_image(_b64(Image.new("RGB", (3, 3)), fmt), "image", max_pixels=1000).size == (3, 3)
